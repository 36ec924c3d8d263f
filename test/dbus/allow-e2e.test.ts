import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import dbus from 'dbus-next';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import type { ReloadOutcome } from '../../src/daemon/part.js';
import { DROP_IN } from '../../src/dbus/allow.js';
import { startFirewallService, type FirewallService } from '../../src/dbus/service.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { nflogPrefixes } from '../support/nflog.js';
import { policyDir } from '../support/policy-dir.js';
import { printed, until } from '../support/wait.js';
import { dbusUnavailable, MemoryStore, quietLog, ROOT, startBuses, TestFeed, type Buses } from './support.js';

/**
 * Allow from the alert, end to end: a connection egressd's table really
 * denies in the test namespace, its real NFLOG prefix mapped through
 * rules.json into a record, the Denied signal to the user's agent
 * (egressctl notify), the notification on a test notification server,
 * "Allow" invoked, the drop-in written and the policy applied by the real
 * `egressctl apply` in the namespace — and then the same connection passes,
 * while another user's stays denied.
 *
 * Stand-ins, named: the denial reader (src/denials/reader.ts, on its own
 * branch) — here the test reads the log group with tcpdump and builds the
 * record, attributing the uid to its app as the reader does; polkit — the
 * service is given a check that says yes for org.egressd.allow, since
 * polkitd is not on the test's private bus.
 */
const CLI = join(ROOT, 'src/cli/main.ts');
const skip = harnessUnavailableReason() ?? dbusUnavailable();

describe.skipIf(skip)(`allow from the alert, end to end ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let buses: Buses;
  let service: FirewallService;
  let state: string;
  let dir: string;
  const feed = new TestFeed();
  const store = new MemoryStore();
  const polkitAsked: string[] = [];

  const apply = async (): Promise<ReloadOutcome> => {
    const result = await net.host.node(CLI, ['apply', dir], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (result.code !== 0) return { applied: false, code: 'EGD_NFT_APPLY', errors: [result.stderr] };
    return { applied: true, digest: 'applied' };
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    buses = await startBuses();
    state = mkdtempSync(join(tmpdir(), 'egd-allow-state-'));
    dir = policyDir(
      {
        '00.yaml': 'defaults: {egress: allow}\ndeny:\n  - to: [203.0.113.1]\n',
        '30-apps.yaml': 'apps:\n  firefox: {identity: {user: egd-app1}}\n',
      },
      { keep: true },
    );
    const first = await apply();
    if (!first.applied) throw new Error(`apply failed: ${first.errors.join('\n')}`);
    feed.subscribe((r) => store.add([r]));
    service = await startFirewallService({
      busAddress: buses.system,
      status: () => ({ state: 'enforcing', digest: 'x', lockdown: false, parts: [] }),
      reload: () => apply(),
      policyDir: dir,
      store,
      feed,
      log: quietLog(),
      polkit: (_sender, action) => {
        polkitAsked.push(action);
        return Promise.resolve(action === 'org.egressd.allow');
      },
    });
  }, 60_000);
  afterAll(async () => {
    await service?.close();
    buses?.stop();
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it('denied → Denied → notification → Allow → drop-in → apply → the next connection passes; another user stays denied', async () => {
    const server = await net.inet.listen({ proto: 'tcp', addr: '203.0.113.1', port: 8443 });
    // The user's desktop: a notification server on a session bus, and the user's agent.
    const session = dbus.sessionBus({ busAddress: buses.session });
    await new Promise((r) => session.once('connect', r));
    const shown: { id: number; summary: string; actions: string[] }[] = [];
    session.addMethodHandler((msg: InstanceType<typeof dbus.Message>) => {
      if (msg.path !== '/org/freedesktop/Notifications') return false;
      if (msg.member === 'GetServerInformation') session.send(dbus.Message.newMethodReturn(msg, 'ssss', ['t', 't', '1', '1.2']));
      else if (msg.member === 'Notify') {
        const [, replacesId, , summary, , actions] = msg.body as [string, number, string, string, string, string[]];
        const id = replacesId || 500 + shown.length;
        shown.push({ id, summary, actions });
        session.send(dbus.Message.newMethodReturn(msg, 'u', [id]));
      } else return false;
      return true;
    });
    await session.requestName('org.freedesktop.Notifications', 0);
    // The agent needs no network: it runs beside the namespaces, as the user, on the buses' sockets.
    const agent = spawn(
      'setpriv',
      [`--reuid=${users.app1.uid}`, `--regid=${users.app1.gid}`, '--clear-groups', '--', process.execPath, '--import', 'tsx', CLI, 'notify'],
      {
        env: { PATH: process.env['PATH'] ?? '', DBUS_SYSTEM_BUS_ADDRESS: buses.system, DBUS_SESSION_BUS_ADDRESS: buses.session, HOME: '/nonexistent' },
        cwd: ROOT,
      },
    );
    try {
      await printed(agent, 'stderr', `listening for denials of uid ${users.app1.uid}`);

      // Denied, for real: the table drops it and logs it with its rule's short id.
      const pcap = join(state, 'nflog.pcap');
      const capture = net.host.spawn('tcpdump', ['-i', 'nflog:7745', '-U', '-w', pcap]);
      const exited = new Promise<void>((resolve) => capture.once('exit', () => resolve()));
      await printed(capture, 'stderr', 'listening on nflog:7745');
      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, user: users.app1.uid, timeoutMs: 1000 })).toMatchObject({ ok: false });
      const captured = () => nflogPrefixes(existsSync(pcap) ? readFileSync(pcap) : Buffer.alloc(0));
      await until('an NFLOG record', () => captured().length >= 1);
      capture.kill('SIGINT');
      await exited;
      const shortId = parseLogPrefix(captured()[0]!)!;
      const table = readRuleTable(state);
      if (table.state !== 'ok') throw new Error(`rules.json: ${JSON.stringify(table)}`);
      const rule = table.value.byId.get(shortId)!;
      expect(rule).toMatchObject({ kind: 'global-deny', file: '00.yaml' });
      const t = Date.now();
      feed.emit({
        firstSeen: t,
        lastSeen: t,
        count: captured().length,
        shortId,
        ruleId: rule.ruleId,
        kind: rule.kind,
        file: rule.file,
        line: rule.line,
        app: 'firefox',
        domain: undefined,
        uid: users.app1.uid,
        gid: users.app1.gid,
        protocol: 'tcp',
        family: 4,
        address: '203.0.113.1',
        port: 8443,
        name: undefined,
      });

      await until('the notification', () => shown.length >= 1);
      expect(shown[0]).toMatchObject({ summary: 'firefox tried to reach 203.0.113.1', actions: ['allow', 'Allow for 1h'] });
      // While the notification is open nothing has changed: the kernel still denies.
      expect(existsSync(join(dir, DROP_IN))).toBe(false);
      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, user: users.app1.uid, timeoutMs: 800 })).toMatchObject({ ok: false });

      session.send(dbus.Message.newSignal('/org/freedesktop/Notifications', 'org.freedesktop.Notifications', 'ActionInvoked', 'us', [shown[0]!.id, 'allow']));
      await until('the answer to Allow', () => shown.length >= 2, { timeoutMs: 60_000 });
      expect(shown[1]!.summary).toBe('Allowed firefox → 203.0.113.1');
      expect(polkitAsked).toEqual(['org.egressd.allow']);
      expect(readFileSync(join(dir, DROP_IN), 'utf8')).toMatch(
        /- app: "firefox"\n {4}allow: \["203\.0\.113\.1"\]\n {4}ports: \[8443\]\n {4}proto: tcp\n {4}until: /,
      );

      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, user: users.app1.uid })).toMatchObject({ ok: true });
      expect(await net.host.connect({ proto: 'tcp', addr: '203.0.113.1', port: 8443, user: users.app2.uid, timeoutMs: 800 })).toMatchObject({ ok: false });
      expect(await server.count()).toBe(1);
    } finally {
      agent.kill('SIGTERM');
      session.disconnect();
    }
  }, 180_000);
});
