import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { DaemonStatus } from '../../src/daemon/part.js';
import { pkcheckPolkit } from '../../src/dbus/access.js';
import { allowanceDetails, DROP_IN } from '../../src/dbus/allow.js';
import { startFirewallService, type FirewallService } from '../../src/dbus/service.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { ensureTestUsers, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { POLKIT_BUS_POLICY, startPolkitAuthority, type PolkitAuthority } from './polkit-authority.js';
import { dbusUnavailable, denial, MemoryStore, quietLog, ROOT, runClient, startBuses, TestFeed, type Buses } from './support.js';

const skip = dbusUnavailable() ?? (existsSync('/usr/bin/pkcheck') ? null : 'pkcheck is not installed (Debian package polkitd)');

/** The actions egressd declares, from the shipped .policy file: message and allow_active of each. */
function declaredActions(): Map<string, { message: string; active: string }> {
  const xml = readFileSync(join(ROOT, 'systemd', 'org.egressd.policy'), 'utf8');
  const actions = new Map<string, { message: string; active: string }>();
  for (const [, id, body] of xml.matchAll(/<action id="([^"]+)">([\s\S]*?)<\/action>/g)) {
    actions.set(id!, { message: /<message>([^<]*)<\/message>/.exec(body!)?.[1] ?? '', active: /<allow_active>([^<]*)<\/allow_active>/.exec(body!)?.[1] ?? '' });
  }
  return actions;
}

/**
 * Which polkit action each call asks, and what pkcheck is told: the daemon's
 * real pkcheck (through a wrapper that points it at the test's bus) asks the
 * test's authority (polkit-authority.ts), which records the action and the
 * details and grants only what the test says — here, as an admin's rule "for
 * their own alerts" would, allow-from-denial.
 */
describe.skipIf(skip)(`polkit actions and details through the real pkcheck ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let buses: Buses;
  let users: TestUsers;
  let polkit: PolkitAuthority;
  let service: FirewallService;
  let bin: string;
  let dir: string;
  const store = new MemoryStore();
  const feed = new TestFeed();
  const status: DaemonStatus = { state: 'enforcing', digest: 'abc', lockdown: false, parts: [] };

  beforeAll(async () => {
    users = ensureTestUsers();
    buses = await startBuses(POLKIT_BUS_POLICY);
    polkit = await startPolkitAuthority(buses.system, (q) => q.action === 'org.egressd.allow-from-denial');
    bin = mkdtempSync(join(tmpdir(), 'egd-pkcheck-'));
    const pkcheck = join(bin, 'pkcheck');
    writeFileSync(pkcheck, `#!/bin/sh\nDBUS_SYSTEM_BUS_ADDRESS='${buses.system}' exec /usr/bin/pkcheck "$@"\n`);
    chmodSync(pkcheck, 0o755);
    dir = policyDir(
      { '10-phone-home.yaml': 'deny:\n  - to: [telemetry.example.org]\n', '30-apps.yaml': 'apps:\n  firefox: {identity: {user: egd-app1}}\n' },
      { keep: true },
    );
    feed.subscribe((r) => store.add([r]));
    service = await startFirewallService({
      busAddress: buses.system,
      status: () => status,
      reload: () => {
        const loaded = loadPolicyDir(dir);
        return Promise.resolve(loaded.ok ? { applied: true, digest: loaded.policy.digest } : { applied: false, code: 'EGD_POLICY_INVALID', errors: [] });
      },
      policyDir: dir,
      store,
      feed,
      log: quietLog(),
      polkit: pkcheckPolkit(pkcheck),
    });
  }, 30_000);
  afterAll(async () => {
    await service?.close();
    polkit?.close();
    buses?.stop();
    if (bin) rmSync(bin, { recursive: true, force: true });
  });

  it('AllowFromDenial asks org.egressd.allow-from-denial, told the app, destination, ports, until and the record; granting it grants neither Allow nor Reload, each asked as its own action', async () => {
    feed.emit(denial({ uid: users.app1.uid, name: 'telemetry.example.org', nameAskedBy: 'sender', address: '203.0.113.7' }));
    const record = store.rows[store.rows.length - 1]!;
    const asked = polkit.asked.length;
    const [fromAlert, anywhere, reload] = await runClient(users.app1, buses.system, [
      ['allow', record.id, '1h'],
      ['allow-app', 'firefox', ['any.example.net'], {}, 'always'],
      ['reload'],
    ]);
    expect(fromAlert).toMatchObject({ ok: { app: 'firefox', to: 'telemetry.example.org' } });
    expect(anywhere!.error).toBe('EGD_ACCESS_DENIED');
    expect(reload!.error).toBe('EGD_ACCESS_DENIED');
    const until = /until: "([^"]+)"/.exec(readFileSync(join(dir, DROP_IN), 'utf8'))?.[1];
    expect(until).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    expect(polkit.asked.slice(asked)).toEqual([
      {
        action: 'org.egressd.allow-from-denial',
        uid: users.app1.uid,
        details: {
          app: 'firefox',
          destinations: 'telemetry.example.org',
          ports: '443',
          proto: 'tcp',
          until,
          'record.id': String(record.id),
          'record.uid': String(users.app1.uid),
        },
      },
      {
        action: 'org.egressd.allow',
        uid: users.app1.uid,
        details: { app: 'firefox', destinations: 'any.example.net', ports: 'any', proto: 'any', until: 'always' },
      },
      { action: 'org.egressd.reload', uid: users.app1.uid, details: {} },
    ]);
    expect(readFileSync(join(dir, DROP_IN), 'utf8')).not.toContain('any.example.net');
  }, 60_000);

  it("another user's record is not found, and polkit is not asked: no dialog for a call that cannot succeed", async () => {
    feed.emit(denial({ uid: users.app1.uid, name: 'other.example.org', nameAskedBy: 'sender', address: '203.0.113.8' }));
    const record = store.rows[store.rows.length - 1]!;
    const asked = polkit.asked.length;
    const [stolen] = await runClient(users.app2, buses.system, [['allow', record.id, '1h']]);
    expect(stolen!.error).toBe('EGD_NOT_FOUND');
    expect(polkit.asked.length).toBe(asked);
  }, 60_000);

  it("a caller's line breaks and bidi controls do not reach the dialog as such", async () => {
    const asked = polkit.asked.length;
    const [answer] = await runClient(users.app1, buses.system, [['allow-app', 'firefox\nallowed by your admin\u202e', ['a.example.org\u2028b'], {}, '1h']]);
    expect(answer!.error).toBe('EGD_ACCESS_DENIED');
    expect(polkit.asked.slice(asked).map((q) => [q.details['app'], q.details['destinations']])).toEqual([
      ['firefox\ufffdallowed by your admin\ufffd', 'a.example.org\ufffdb'],
    ]);
  }, 60_000);

  it('the shipped .policy declares each action with its default, and every $(key) of its message is a detail egressd passes', () => {
    const actions = declaredActions();
    expect([...actions.keys()].sort()).toEqual(['org.egressd.allow', 'org.egressd.allow-from-denial', 'org.egressd.reload']);
    expect(actions.get('org.egressd.allow-from-denial')!.active).toBe('auth_admin_keep');
    expect(actions.get('org.egressd.allow')!.active).toBe('auth_admin');
    expect(actions.get('org.egressd.reload')!.active).toBe('auth_admin');
    const entry = { app: 'firefox', allow: ['example.org'], ports: [443], proto: 'tcp' as const, why: '' };
    const keysOf = (message: string) => [...message.matchAll(/\$\(([^)]*)\)/g)].map((m) => m[1]!);
    for (const [id, details] of [
      ['org.egressd.allow-from-denial', allowanceDetails(entry, { id: 7, uid: 1000 })],
      ['org.egressd.allow', allowanceDetails(entry)],
      ['org.egressd.reload', {}],
    ] as const) {
      const message = actions.get(id)!.message;
      if (id !== 'org.egressd.reload') expect(keysOf(message), id).toContain('app');
      for (const key of keysOf(message)) expect(Object.keys(details), `${id}: $(${key})`).toContain(key);
    }
  });
});
