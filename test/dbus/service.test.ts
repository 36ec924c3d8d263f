import { spawn } from 'node:child_process';
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import dbus from 'dbus-next';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { DaemonStatus, ReloadOutcome } from '../../src/daemon/part.js';
import { DROP_IN } from '../../src/dbus/allow.js';
import { BUS_NAME, INTERFACE, OBJECT_PATH, startFirewallService, type FirewallService } from '../../src/dbus/service.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { explain } from '../../src/compile/explain.js';
import { ensureTestUsers, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import {
  dbusUnavailable,
  denial,
  ensureAuditUser,
  MemoryStore,
  quietLog,
  runClient,
  startBuses,
  startClient,
  TestFeed,
  ROOT,
  type AuditUsers,
  type Buses,
} from './support.js';

const skip = dbusUnavailable();

const POLICY = {
  '10-phone-home.yaml': `deny:
  - to: [telemetry.example.org]
`,
  '30-apps.yaml': `apps:
  firefox:
    identity: {user: egd-app1}
    rules:
      - deny: [tracker.example.net]
`,
};

describe.skipIf(skip)(`org.egressd.Firewall1 on a real system-like bus ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let buses: Buses;
  let users: TestUsers;
  let audit: AuditUsers;
  let service: FirewallService;
  let store: MemoryStore;
  let feed: TestFeed;
  let dir: string;
  const reloads: string[] = [];
  let reloadAnswer: (dir: string) => ReloadOutcome;
  const root = { uid: 0, gid: 0 };
  const status: DaemonStatus = {
    state: 'enforcing',
    digest: 'abc123',
    lockdown: false,
    parts: [
      { name: 'resolver', state: 'running', detail: 'on 127.0.0.153', restarts: 0 },
      { name: 'tor', state: 'running', detail: 'updates: blocked — Tor not running', restarts: 0 },
    ],
  };

  /** The stand-in reload: loads what the daemon would apply and answers as applyPolicy would. */
  const loadAnswer = (d: string): ReloadOutcome => {
    const loaded = loadPolicyDir(d);
    return loaded.ok
      ? { applied: true, digest: loaded.policy.digest }
      : { applied: false, code: 'EGD_POLICY_INVALID', errors: loaded.errors.map((e) => e.message) };
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    audit = ensureAuditUser();
    buses = await startBuses();
    dir = policyDir(POLICY, { keep: true });
    store = new MemoryStore();
    feed = new TestFeed();
    feed.subscribe((r) => store.add([r]));
    reloadAnswer = loadAnswer;
    service = await startFirewallService({
      busAddress: buses.system,
      status: () => status,
      reload: async (why) => {
        reloads.push(why);
        return reloadAnswer(dir);
      },
      policyDir: dir,
      store,
      feed,
      log: quietLog(),
      auditGroup: audit.group,
    });
  }, 30_000);
  afterAll(async () => {
    await service?.close();
    buses?.stop();
  });
  beforeEach(() => {
    reloadAnswer = loadAnswer;
  });

  it('Status and the properties answer anyone, with the daemon state and the denial counters (lost events included)', async () => {
    // Records the store's bounded queue could not take are a loss too, told beside the reader's.
    store.dropped = 7;
    const [line] = await runClient(users.app2, buses.system, [['status']]);
    expect(line!.ok).toMatchObject({
      state: 'enforcing',
      digest: 'abc123',
      lockdown: false,
      lost: 3,
      enobufs: 1,
      sequenceGaps: 2,
      storeDropped: 7,
      storeDroppedEvents: 7,
    });
    // Updates over Tor in one line, as egressctl status and tor status say it (the daemon's tor part).
    expect(line!.ok).toMatchObject({ updates: 'updates: blocked — Tor not running' });
    const bus = dbus.sessionBus({ busAddress: buses.system });
    try {
      const obj = await bus.getProxyObject(BUS_NAME, OBJECT_PATH);
      const props = obj.getInterface('org.freedesktop.DBus.Properties') as unknown as Record<string, (...args: unknown[]) => Promise<unknown>>;
      const all = (await props['GetAll']!(INTERFACE)) as Record<string, { value: unknown }>;
      expect(all['State']!.value).toBe('enforcing');
      expect(all['PolicyDigest']!.value).toBe('abc123');
      expect(all['LostEvents']!.value).toBe(3n);
      expect(all['StoreDroppedRecords']!.value).toBe(7n);
      await expect(props['Set']!(INTERFACE, 'State', new dbus.Variant('s', 'x'))).rejects.toMatchObject({ type: 'org.egressd.Firewall1.Error.AccessDenied' });
    } finally {
      bus.disconnect();
      store.dropped = 0;
    }
  });

  it('Reload: an unprivileged uid is refused with AccessDenied and nothing reloads; root reloads', async () => {
    const before = reloads.length;
    const [refused] = await runClient(users.app1, buses.system, [['reload']]);
    expect(refused).toMatchObject({ error: 'EGD_ACCESS_DENIED', message: expect.stringContaining('Reload: not allowed for uid') });
    const [audited] = await runClient(audit.auditor, buses.system, [['reload']]);
    expect(audited!.error).toBe('EGD_ACCESS_DENIED');
    expect(reloads.length).toBe(before);
    const [ok] = await runClient(root, buses.system, [['reload']]);
    expect(ok!.ok).toMatchObject({ applied: true, digest: expect.stringMatching(/^[0-9a-f]{64}$/) });
    expect(reloads.length).toBe(before + 1);
  });

  it('QueryDenials: root and egressd-audit members (by NSS, not the groups a process brings) read every uid; a user is refused', async () => {
    feed.emit(denial({ uid: users.app1.uid }));
    feed.emit(denial({ uid: users.app2.uid, address: '203.0.113.8' }));
    const [asUser] = await runClient(users.app1, buses.system, [['query', {}]]);
    expect(asUser!.error).toBe('EGD_ACCESS_DENIED');
    for (const who of [root, audit.auditor]) {
      const [line] = await runClient(who, buses.system, [
        ['query', {}],
        ['query', { uid: users.app2.uid }],
      ]);
      const uids = (line!.ok as { uid: number }[]).map((r) => r.uid);
      expect(uids).toContain(users.app1.uid);
      expect(uids).toContain(users.app2.uid);
    }
    const [, filtered] = await runClient(root, buses.system, [
      ['query', {}],
      ['query', { uid: users.app2.uid }],
    ]);
    expect((filtered!.ok as { uid: number; address: string; id: number }[]).every((r) => r.uid === users.app2.uid && r.id > 0)).toBe(true);
  });

  it("Denied goes to each agent of the record's uid only; all records only to root/audit; a forged Denied from another user never reaches an agent", async () => {
    const a1 = startClient(users.app1, buses.system, [['subscribe']]);
    const a2 = startClient(users.app2, buses.system, [['subscribe']]);
    const auditor = startClient(audit.auditor, buses.system, [['subscribe', { all: true }]]);
    const greedy = startClient(users.app3, buses.system, [['subscribe', { all: true }]]);
    try {
      await a1.waitFor((l) => l.length >= 1);
      await a2.waitFor((l) => l.length >= 1);
      await auditor.waitFor((l) => l.length >= 1);
      await greedy.waitFor((l) => l.length >= 1);
      expect(a1.lines[0]!.ok).toEqual({ uid: users.app1.uid, all: false });
      expect(auditor.lines[0]!.ok).toEqual({ uid: audit.auditor.uid, all: true });
      expect(greedy.lines[0]).toMatchObject({ error: 'EGD_ACCESS_DENIED' });

      // app2 addresses a Denied of its own to app1's agent: the bus policy refuses it, and the agent takes Denied only from egressd's connection.
      const [forged] = await runClient(users.app2, buses.system, [['forge', a1.lines[0]!.name]]);
      expect(forged!.ok).toBe('sent');

      feed.emit(denial({ uid: users.app1.uid, address: '203.0.113.11', name: 'one.example.org' }));
      feed.emit(denial({ uid: users.app2.uid, address: '203.0.113.12', name: 'two.example.org' }));
      feed.emit(denial({ uid: undefined, address: '203.0.113.13', name: 'orphan.example.org' }));
      await auditor.waitFor((l) => l.filter((x) => x.denied).length >= 3);
      await a1.waitFor((l) => l.some((x) => x.denied));
      await a2.waitFor((l) => l.some((x) => x.denied));
      await new Promise((r) => setTimeout(r, 300));
      expect(a1.lines.filter((x) => x.denied).map((x) => x.denied!.name)).toEqual(['one.example.org']);
      expect(a2.lines.filter((x) => x.denied).map((x) => x.denied!.name)).toEqual(['two.example.org']);
      expect(auditor.lines.filter((x) => x.denied).map((x) => x.denied!.name)).toEqual(['one.example.org', 'two.example.org', 'orphan.example.org']);
      // The signal carries the store's row id, so the agent can allow from it.
      const one = a1.lines.find((x) => x.denied)!;
      expect(one.id).toBeGreaterThan(0);
      expect((await store.get(one.id!))!.name).toBe('one.example.org');
      expect(one.denied).toMatchObject({ uid: users.app1.uid, port: 443, protocol: 'tcp', family: 4 });
      // Exactly the record's fields that have values (domain is unset here), nothing more.
      expect(Object.keys(one.denied!).sort()).toEqual(
        [
          'address',
          'app',
          'count',
          'family',
          'file',
          'firstSeen',
          'gid',
          'kind',
          'lastSeen',
          'line',
          'name',
          'nameAskedBy',
          'port',
          'protocol',
          'ruleId',
          'shortId',
          'uid',
        ].sort(),
      );
      expect(service.stats().subscribers).toBe(3);
    } finally {
      for (const a of [a1, a2, auditor, greedy]) a.stop();
    }
    // Agents that left the bus are forgotten.
    const end = Date.now() + 5000;
    while (service.stats().subscribers > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
    expect(service.stats().subscribers).toBe(0);
  }, 120_000);

  it("a user's Denied carries a name only its own uid looked up: a probe to another user's address tells it nothing of that user's lookups; root/audit see the record whole", async () => {
    // app2 sends to the address app1's browser talks to (read from /proc/net/tcp) and is denied: the resolver knows that
    // address only from app1's lookup, so app2's record holds app1's name, marked as others'.
    const prober = startClient(users.app2, buses.system, [['subscribe']]);
    const auditor = startClient(audit.auditor, buses.system, [['subscribe', { all: true }]]);
    try {
      await prober.waitFor((l) => l.length >= 1);
      await auditor.waitFor((l) => l.length >= 1);
      const probe = denial({ uid: users.app2.uid, address: '203.0.113.41', name: 'private.app1.example', nameAskedBy: 'others' });
      const own = denial({ uid: users.app2.uid, address: '203.0.113.42', name: 'own.app2.example', nameAskedBy: 'sender' });
      feed.emit(probe);
      feed.emit(own);
      await prober.waitFor((l) => l.filter((x) => x.denied).length >= 2);
      await auditor.waitFor((l) => l.filter((x) => x.denied).length >= 2);
      const got = prober.lines.filter((x) => x.denied);
      expect(got.map((x) => [x.denied!.address, x.denied!.name ?? null, x.denied!.nameAskedBy ?? null])).toEqual([
        ['203.0.113.41', null, null],
        ['203.0.113.42', 'own.app2.example', 'sender'],
      ]);
      expect(JSON.stringify(prober.lines)).not.toContain('private.app1.example');
      // Still the record it can allow from (by its id; the allow would write the address).
      expect(got[0]!.id).toBe(store.idOf(probe));
      expect(auditor.lines.filter((x) => x.denied).map((x) => [x.denied!.name, x.denied!.nameAskedBy])).toEqual([
        ['private.app1.example', 'others'],
        ['own.app2.example', 'sender'],
      ]);
    } finally {
      prober.stop();
      auditor.stop();
    }
  }, 120_000);

  it("each Denied carries its own record's store id, also beside a later aggregate of the same identity, destination and rule; a burst goes out whole, a bounded number per tick", async () => {
    const auditor = startClient(audit.auditor, buses.system, [['subscribe', { all: true }]]);
    try {
      await auditor.waitFor((l) => l.length >= 1);
      // The first packet's record (count 1) and, in the same tick, the aggregate that followed it (the same key, a span covering the first).
      const first = denial({ uid: users.app1.uid, address: '203.0.113.21', name: 'same.example.org' });
      const later = { ...first, count: 4, lastSeen: first.lastSeen + 3000 };
      feed.emit(first);
      feed.emit(later);
      // A burst past one tick's cap (256): every record still signalled, in order, each with its id.
      const burst = Array.from({ length: 600 }, (_, i) => denial({ uid: users.app2.uid, address: `198.51.${i >> 8}.${i & 255}`, name: `b${i}.example.org` }));
      const sentBefore = service.stats().signalsSent;
      for (const r of burst) feed.emit(r);
      // Signals sent between two turns of the loop: the work one tick does.
      let mostInOneTurn = 0;
      for (let last = sentBefore, end = Date.now() + 30_000; last < sentBefore + 602 && Date.now() < end;) {
        await new Promise((r) => setImmediate(r));
        const now = service.stats().signalsSent;
        mostInOneTurn = Math.max(mostInOneTurn, now - last);
        last = now;
      }
      expect(service.stats().signalsSent - sentBefore).toBe(602);
      expect(mostInOneTurn).toBeLessThanOrEqual(256);
      await auditor.waitFor((l) => l.filter((x) => x.denied).length >= 602, 30_000);
      const got = auditor.lines.filter((x) => x.denied);
      expect(got.map((x) => x.id)).toEqual([first, later, ...burst].map((r) => store.idOf(r)));
      expect(got[0]!.id).not.toBe(got[1]!.id);
      expect(await store.get(got[0]!.id!)).toMatchObject({ count: 1, address: '203.0.113.21' });
      expect(await store.get(got[1]!.id!)).toMatchObject({ count: 4, address: '203.0.113.21' });
      expect(got.slice(2).map((x) => x.denied!.name)).toEqual(burst.map((r) => r.name));
      expect(service.stats().signalsDropped).toBe(0);
    } finally {
      auditor.stop();
    }
  }, 120_000);

  it("AllowFromDenial: refused for a user (even for its own record) and nothing is written; root's allow is checked, written with who/when/which record, and applied", async () => {
    feed.emit(denial({ uid: users.app1.uid, name: 'telemetry.example.org', address: '203.0.113.7' }));
    const record = store.rows[store.rows.length - 1]!;
    const before = reloads.length;
    const [refused, badScope] = await runClient(users.app1, buses.system, [
      ['allow', record.id, '1h'],
      ['allow', record.id, 'forever'],
    ]);
    expect(refused!.error).toBe('EGD_ACCESS_DENIED');
    // Refused before its arguments are read: an unauthorized caller learns nothing from them.
    expect(badScope!.error).toBe('EGD_ACCESS_DENIED');
    const [audited] = await runClient(audit.auditor, buses.system, [['allow', record.id, 'always']]);
    expect(audited!.error).toBe('EGD_ACCESS_DENIED');
    expect(existsSync(join(dir, DROP_IN))).toBe(false);
    expect(reloads.length).toBe(before);

    const [ok] = await runClient(root, buses.system, [['allow', record.id, '1h']]);
    expect(ok!.ok).toMatchObject({ app: 'firefox', to: 'telemetry.example.org', digest: expect.stringMatching(/^[0-9a-f]{64}$/) });
    expect(reloads.length).toBe(before + 1);
    const text = readFileSync(join(dir, DROP_IN), 'utf8');
    expect(text).toContain(`# allowed by root (uid 0) at `);
    expect(text).toContain(`from denial record ${record.id} (rule r0a1b2c3d deny/10-phone-home.yaml/0 at 10-phone-home.yaml:23), until `);
    expect(text).toMatch(
      /- app: "firefox"\n {4}allow: \["telemetry.example.org"\]\n {4}ports: \[443\]\n {4}proto: tcp\n {4}until: "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"/,
    );
    // What the drop-in means: firefox may now reach the name the global deny list holds; another app may not.
    const loaded = loadPolicyDir(dir);
    expect(loaded.ok).toBe(true);
    if (!loaded.ok) return;
    const fx = loaded.policy.apps.find((a) => a.name === 'firefox')!;
    expect(fx.rules[0]).toMatchObject({
      id: 'app/firefox/allowed/0',
      verdict: 'allow',
      to: { names: ['telemetry.example.org'] },
      ports: [{ from: 443, to: 443 }],
      protocols: ['tcp'],
    });
    expect(explain).toBeTypeOf('function');
  });

  it("AllowFromDenial: a name only another user looked up is not what the allow opens: it writes the record's address, port and protocol", async () => {
    // Mallory pointed cdn.mallory.example at the address firefox was denied; firefox's user never looked it up.
    feed.emit(denial({ uid: users.app1.uid, name: 'cdn.mallory.example', nameAskedBy: 'others', address: '203.0.113.31' }));
    const record = store.rows[store.rows.length - 1]!;
    const [ok] = await runClient(root, buses.system, [['allow', record.id, '1h']]);
    expect(ok!.ok).toMatchObject({ app: 'firefox', to: '203.0.113.31' });
    const text = readFileSync(join(dir, DROP_IN), 'utf8');
    expect(text).toMatch(/- app: "firefox"\n {4}allow: \["203.0.113.31"\]\n {4}ports: \[443\]\n {4}proto: tcp\n/);
    expect(text).not.toMatch(/allow: \[[^\]]*cdn\.mallory\.example/);
  });

  it('AllowFromDenial: a failed apply leaves the drop-in as it was; a system-domain denial and unknown ids are refused clearly', async () => {
    feed.emit(denial({ uid: users.app1.uid, name: 'second.example.org', address: '203.0.113.9' }));
    const record = store.rows[store.rows.length - 1]!;
    const before = existsSync(join(dir, DROP_IN)) ? readFileSync(join(dir, DROP_IN), 'utf8') : undefined;
    reloadAnswer = () => ({ applied: false, code: 'EGD_NFT_APPLY', errors: ['nft said no'] });
    const [failed] = await runClient(root, buses.system, [['allow', record.id, 'always']]);
    expect(failed).toMatchObject({ error: 'EGD_POLICY_INVALID', message: expect.stringContaining('could not be applied (EGD_NFT_APPLY)') });
    expect(existsSync(join(dir, DROP_IN)) ? readFileSync(join(dir, DROP_IN), 'utf8') : undefined).toBe(before);
    reloadAnswer = loadAnswer;

    feed.emit(denial({ uid: users.app1.uid, kind: 'system-domain', ruleId: 'sd/offline', app: undefined, domain: 'offline' }));
    const sd = store.rows[store.rows.length - 1]!;
    feed.emit(denial({ uid: users.app1.uid, kind: 'global-deny', app: undefined, name: 'x.example.org' }));
    const noApp = store.rows[store.rows.length - 1]!;
    const lines = await runClient(root, buses.system, [
      ['allow', sd.id, '1h'],
      ['allow', noApp.id, '1h'],
      ['allow', 999999, '1h'],
      ['allow', record.id, 'forever'],
      ['allow', record.id, '9999d'],
    ]);
    expect(lines.map((l) => l.error)).toEqual(['EGD_NOT_ALLOWABLE', 'EGD_NOT_ALLOWABLE', 'EGD_NOT_FOUND', 'EGD_INVALID_ARGUMENT', 'EGD_INVALID_ARGUMENT']);
    expect(lines[0]!.message).toContain('sd/offline (system-domain), which no app rule can open');
    expect(lines[3]!.message).toContain('scope: "forever" is not a duration');
  });

  it('malformed arguments: a wrong signature, unknown or mistyped filter keys, a huge limit — each a clear error naming the field; the service answers after', async () => {
    const bus = dbus.sessionBus({ busAddress: buses.system });
    await new Promise((r) => bus.once('connect', r));
    const call = (member: string, signature: string, body: unknown[]) =>
      bus.call(new dbus.Message({ destination: BUS_NAME, path: OBJECT_PATH, interface: INTERFACE, member, signature, body })).then(
        () => 'ok',
        (e: unknown) => `${(e as { type: string }).type}: ${(e as { text: string }).text}`,
      );
    const V = dbus.Variant;
    try {
      expect(await call('QueryDenials', 's', ['all'])).toBe('org.egressd.Firewall1.Error.InvalidArgs: QueryDenials takes (a{sv}), not (s)');
      expect(await call('QueryDenials', 'a{sv}', [{ uidd: new V('u', 1) }])).toMatch(/InvalidArgs: unknown filter key "uidd"/);
      expect(await call('QueryDenials', 'a{sv}', [{ uid: new V('s', '0') }])).toMatch(/InvalidArgs: uid: expected an integer, got type "s"/);
      expect(await call('QueryDenials', 'a{sv}', [{ limit: new V('t', 10n ** 15n) }])).toMatch(/InvalidArgs: limit: .* is out of range/);
      expect(await call('QueryDenials', 'a{sv}', [{ since: new V('x', 5), until: new V('x', 1) }])).toMatch(/InvalidArgs: since: is after until/);
      expect(await call('QueryDenials', 'a{sv}', [{ app: new V('s', 'x'.repeat(10_000)) }])).toMatch(/InvalidArgs: app: must be 1–255 characters/);
      expect(await call('AllowFromDenial', 'st', ['1', 5])).toBe('org.egressd.Firewall1.Error.InvalidArgs: AllowFromDenial takes (ts), not (st)');
      expect(await call('Subscribe', 'a{sv}', [{ everything: new V('b', true) }])).toMatch(/InvalidArgs: unknown option "everything"/);
      expect(await call('NoSuchMethod', '', [])).toMatch(/UnknownMethod/);
      expect(await call('Status', '', [])).toBe('ok');
    } finally {
      bus.disconnect();
    }
  });

  it('egressctl allow: --record through D-Bus as root (exit 0), refused for a user (exit 1); --app without a daemon writes the checked drop-in (exit 0), a bad one changes nothing (exit 2)', async () => {
    const cli = (user: { uid: number; gid: number }, args: string[], env: Record<string, string>) =>
      new Promise<{ code: number | null; err: string }>((resolve) => {
        const child = spawn(
          'setpriv',
          [
            `--reuid=${user.uid}`,
            `--regid=${user.gid}`,
            '--clear-groups',
            '--',
            process.execPath,
            '--import',
            'tsx',
            join(ROOT, 'src/cli/main.ts'),
            'allow',
            ...args,
          ],
          { cwd: ROOT, env: { PATH: process.env['PATH'], ...env } },
        );
        let err = '';
        child.stderr.on('data', (d: Buffer) => (err += d.toString()));
        child.on('exit', (code) => resolve({ code, err }));
      });
    feed.emit(denial({ uid: users.app1.uid, name: 'cli.example.org', address: '203.0.113.10' }));
    const record = store.rows[store.rows.length - 1]!;
    const onBus = { DBUS_SYSTEM_BUS_ADDRESS: buses.system };
    const refused = await cli(users.app1, ['--record', String(record.id)], onBus);
    expect(refused).toMatchObject({ code: 1, err: expect.stringContaining('AllowFromDenial: not allowed for uid') });
    const ok = await cli(root, ['--record', String(record.id), '--for', '1d'], onBus);
    expect(ok.err).toMatch(/^allowed firefox → cli\.example\.org until \d{4}-.*\(80-allowed\.yaml; policy [0-9a-f]{12} in force\)/);
    expect(ok.code).toBe(0);
    expect(readFileSync(join(dir, DROP_IN), 'utf8')).toContain('allow: ["cli.example.org"]');

    const offline = policyDir(POLICY);
    const noBus = { DBUS_SYSTEM_BUS_ADDRESS: `unix:path=${buses.dir}/nothing-here` };
    const written = await cli(
      root,
      ['--app', 'firefox', '--to', 'manual.example.org', '--port', '8443', '--proto', 'tcp', '--always', '--dir', offline],
      noBus,
    );
    expect(written).toMatchObject({ code: 0, err: expect.stringContaining('egressd is not running: the allow is written to') });
    expect(readFileSync(join(offline, DROP_IN), 'utf8')).toMatch(/allow: \["manual.example.org"\]\n {4}ports: \[8443\]\n {4}proto: tcp\n {4}why: "allowed by/);
    const before = readFileSync(join(offline, DROP_IN), 'utf8');
    const bad = await cli(root, ['--app', 'chromium', '--to', 'x.example.org', '--dir', offline], noBus);
    expect(bad.code).toBe(2);
    expect(bad.err).toContain('allowed: unknown app "chromium"');
    expect(readFileSync(join(offline, DROP_IN), 'utf8')).toBe(before);
  }, 120_000);

  it('a user cannot hold unbounded subscriptions, nor own the name', async () => {
    const bus = dbus.sessionBus({ busAddress: buses.system });
    await new Promise((r) => bus.once('connect', r));
    // The test runs as root; the bus policy is what stops a user, so ask as one.
    bus.disconnect();
    const [owned] = await runClient(users.app1, buses.system, [['own']]);
    expect(owned).toMatchObject({ error: 'unknown', message: expect.stringContaining('not allowed to own the service "org.egressd.Firewall1"') });
    const [many] = await runClient(users.app3, buses.system, [['subscribe-many', 9]]);
    const results = many!.ok as { ok?: unknown; error?: string }[];
    expect(results.filter((r) => r.ok)).toHaveLength(8);
    expect(results.filter((r) => r.error).map((r) => r.error)).toEqual([
      'D-Bus: org.egressd.Firewall1.Error.LimitsExceeded: too many subscriptions (at most 8 per user)',
    ]);
  }, 120_000);
});
