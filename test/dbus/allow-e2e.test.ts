import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import dbus from 'dbus-next';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DROP_IN } from '../../src/dbus/allow.js';
import { connectFirewall, type FirewallClient } from '../../src/dbus/client.js';
import { ErrorCode } from '../../src/errors.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import {
  createTestNet,
  ensureTestUsers,
  harnessUnavailableReason,
  type LoopResult,
  type SendLoop,
  type Server,
  type TestNet,
  type TestUsers,
} from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { printed, until } from '../support/wait.js';
import { POLKIT_BUS_POLICY, startPolkitAuthority, type PolkitAuthority } from './polkit-authority.js';
import { dbusUnavailable, ROOT, runClient, startBuses, startClient, type Agent, type Buses } from './support.js';

/**
 * Allow from the alert, end to end, with nothing built by the test but the
 * traffic: the real egressd (dist/daemon/main.js, parts denials,
 * denial-store and dbus) enforcing in the namespace harness and on a
 * private system-like bus with the shipped bus policy. An app's connection
 * is dropped by the kernel, logged, read by the daemon's NFLOG reader,
 * stored in its SQLite store, signalled (Denied, with the store's record id)
 * to the user's agent (`egressctl notify`), shown on a test notification
 * server; "Allow" calls AllowFromDenial with that id; the daemon writes the
 * drop-in and re-applies; the next connection passes while another user's
 * stays dropped.
 *
 * The table never allows more than before or after: while the Allow is
 * asked and applied, connections keep being tried from the other user and
 * from the allowed app to a port the allow does not name, and the servers
 * see none of them; before the Allow, the allowed app's own tries to the
 * destination never reach the server either.
 *
 * Stand-in, named: polkit's decision. The daemon runs the real pkcheck,
 * which asks an authority of the test's own on the private bus
 * (polkit-authority.ts) that says yes to org.egressd.allow-from-denial for
 * everyone — so that a user refused another user's record is refused by the
 * record's owner check, not by polkit.
 */
const MAIN = join(ROOT, 'dist/daemon/main.js');
const CLI = join(ROOT, 'src/cli/main.ts');
const DEST = '203.0.113.1';
const PORT = 8443;
/** The same destination on a port the allow does not name. */
const OTHER_PORT = 8444;
/** Probe loops per kind while the allow is applied. */
const PROBES = 4;

function buildMissing(): string | null {
  if (!existsSync(MAIN)) return 'no build: run npm run build';
  const built = statSync(MAIN).mtimeMs;
  const newer = (dir: string): boolean =>
    readdirSync(dir, { withFileTypes: true }).some((e) =>
      e.isDirectory() ? newer(join(dir, e.name)) : e.name.endsWith('.ts') && statSync(join(dir, e.name)).mtimeMs > built,
    );
  // A stale build would test old code and pass or fail for the wrong reason.
  if (newer(join(ROOT, 'src'))) throw new Error('dist/ is older than src/: run npm run build');
  return null;
}
const skip = harnessUnavailableReason() ?? dbusUnavailable() ?? buildMissing();

interface LogLine {
  event?: string;
  msg?: string;
  [key: string]: unknown;
}

describe.skipIf(skip)(`allow from the alert, end to end ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let buses: Buses;
  let polkit: PolkitAuthority;
  let daemon: ChildProcess;
  const log: LogLine[] = [];
  let state: string;
  let dir: string;
  let servers: { allowed: Server; other: Server };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    buses = await startBuses(POLKIT_BUS_POLICY);
    polkit = await startPolkitAuthority(buses.system, (q) => q.action === 'org.egressd.allow-from-denial');
    state = mkdtempSync(join(tmpdir(), 'egd-allow-state-'));
    dir = policyDir(
      {
        '00.yaml': `defaults: {egress: allow}\ndeny:\n  - to: [${DEST}]\n`,
        '30-apps.yaml': 'apps:\n  firefox: {identity: {user: egd-app1}}\n',
      },
      { keep: true },
    );
    servers = {
      allowed: await net.inet.listen({ proto: 'tcp', addr: DEST, port: PORT }),
      other: await net.inet.listen({ proto: 'tcp', addr: DEST, port: OTHER_PORT }),
    };
    // The real daemon in the host namespace: the bus is the test's (DBUS_SYSTEM_BUS_ADDRESS, which its pkcheck inherits too), the journal none.
    daemon = net.host.spawn(process.execPath, [MAIN, '--policy', dir, '--state', state, '--no-resolver', '--no-apps', '--no-tor'], {
      env: {
        PATH: process.env['PATH'] ?? '/usr/sbin:/usr/bin:/sbin:/bin',
        DBUS_SYSTEM_BUS_ADDRESS: buses.system,
        EGRESSD_JOURNAL_SOCKET: join(state, 'no-journal'),
      },
    });
    createInterface({ input: daemon.stdout! }).on('line', (text) => {
      try {
        log.push(JSON.parse(text) as LogLine);
      } catch {
        log.push({ msg: text });
      }
    });
    daemon.stderr!.on('data', (chunk: Buffer) => process.stderr.write(chunk));
    const started = (part: string) => log.some((l) => l.event === 'part-started' && l['part'] === part);
    await until('egressd enforcing with its denial reader, store and D-Bus service', () => started('denials') && started('denial-store') && started('dbus'), {
      timeoutMs: 30_000,
    });
  }, 90_000);
  afterAll(async () => {
    daemon?.kill('SIGTERM');
    polkit?.close();
    buses?.stop();
    await net?.destroy();
    if (state) rmSync(state, { recursive: true, force: true });
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  const tcp = (uid: number, port = PORT, timeoutMs = 800) => net.host.connect({ proto: 'tcp', addr: DEST, port, user: uid, timeoutMs });
  /** Tries `port` from `uid` every few ms, at most `count` times and `maxMs` long: it stops by itself. */
  const probe = (uid: number, port: number, payload: string, maxMs = 60_000): SendLoop =>
    net.host.sendLoop({ proto: 'tcp', addr: DEST, port, user: uid, count: 2000, intervalMs: 10, attemptTimeoutMs: 150, maxMs, payload });

  /** Loops as one: their attempts and successes added up. */
  const combined = (group: SendLoop[]) => {
    const sum = (results: LoopResult[]) => ({ attempts: results.reduce((n, r) => n + r.attempts, 0), successes: results.reduce((n, r) => n + r.successes, 0) });
    return { loops: group, progress: () => sum(group.map((l) => l.progress)), done: async () => sum(await Promise.all(group.map((l) => l.done))) };
  };

  it('denied → reader → store → Denied (store id) → notification → Allow → drop-in → re-apply → the next connection passes; another user stays denied; the table never allowed more', async () => {
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
    // The Denied signals the user's own subscription gets, with their ids: what the agent was told.
    let watcher: Agent | undefined;
    let root: FirewallClient | undefined;
    const loops: SendLoop[] = [];
    try {
      await printed(agent, 'stderr', `listening for denials of uid ${users.app1.uid}`);
      watcher = startClient(users.app1, buses.system, [['subscribe', {}]]);
      await watcher.waitFor((lines) => lines.some((l) => l.ok !== undefined));
      root = await connectFirewall({ busAddress: buses.system });

      // From the start until the Allow is asked, the app keeps trying: none of it may reach the server.
      const before = probe(users.app1.uid, PORT, 'app1-before-allow\n');
      loops.push(before);

      // Denied, for real: the kernel drops it; the daemon's reader, store and D-Bus service do the rest.
      expect(await tcp(users.app1.uid, PORT, 1000)).toMatchObject({ ok: false });
      await watcher.waitFor((lines) => lines.some((l) => l.denied !== undefined && (l.id ?? 0) > 0));
      const signalled = watcher.lines.find((l) => l.denied !== undefined && (l.id ?? 0) > 0)!;
      const table = readRuleTable(state);
      if (table.state !== 'ok') throw new Error(`rules.json: ${JSON.stringify(table)}`);
      const shortId = signalled.denied!.shortId;
      const rule = table.value.byId.get(shortId)!;
      expect(rule).toMatchObject({ kind: 'global-deny', file: '00.yaml' });
      // The record as the reader made it: its rule, identity, destination and nothing else.
      expect(signalled.denied).toMatchObject({
        shortId,
        ruleId: rule.ruleId,
        kind: 'global-deny',
        file: '00.yaml',
        line: rule.line,
        app: 'firefox',
        uid: users.app1.uid,
        gid: users.app1.gid,
        protocol: 'tcp',
        family: 4,
        address: DEST,
        port: PORT,
      });
      // The id is the store's: root reads the same record under it.
      const stored = await root.queryDenials({ uid: users.app1.uid });
      const recordId = signalled.id!;
      expect(stored.find((r) => r.id === recordId)).toMatchObject({ shortId, app: 'firefox', uid: users.app1.uid, address: DEST, port: PORT });

      await until('the notification', () => shown.length >= 1);
      expect(shown[0]).toMatchObject({ summary: `firefox tried to reach ${DEST}`, actions: ['allow', 'Allow for 1h'] });
      // While the notification is open nothing has changed: the kernel still denies.
      expect(existsSync(join(dir, DROP_IN))).toBe(false);
      expect(await tcp(users.app1.uid)).toMatchObject({ ok: false });

      // Another user may not allow from this record: the same answer as a record that does not exist, nobody asked, and nothing written.
      const asked = polkit.asked.length;
      const [stolen] = await runClient(users.app2, buses.system, [['allow', recordId, '1h']]);
      expect(stolen).toMatchObject({ error: ErrorCode.NotFound });
      expect(polkit.asked.slice(asked)).toEqual([]);
      expect(existsSync(join(dir, DROP_IN))).toBe(false);
      expect(await tcp(users.app1.uid)).toMatchObject({ ok: false });

      // Up to the Allow, none of the app's tries got through.
      const beforeTotals = await before.stop();
      expect(beforeTotals.attempts).toBeGreaterThan(3);
      expect(beforeTotals.successes).toBe(0);
      expect(await servers.allowed.count()).toBe(0);

      // During the Allow and its re-apply: the other user to the allowed port, the app to a port the allow does not name.
      // Several loops each: a dropped try waits out its timeout, and the swap takes well under a second.
      const many = (uid: number, port: number, payload: string) => Array.from({ length: PROBES }, () => probe(uid, port, payload, 15_000));
      const otherUser = combined(many(users.app2.uid, PORT, 'app2-during-apply\n'));
      const otherPort = combined(many(users.app1.uid, OTHER_PORT, 'app1-other-port\n'));
      loops.push(...otherUser.loops, ...otherPort.loops);
      await until('the probes running', () => otherUser.progress().attempts >= 3 * PROBES && otherPort.progress().attempts >= 3 * PROBES);
      const applies = log.filter((l) => l.event === 'applied').length;

      session.send(dbus.Message.newSignal('/org/freedesktop/Notifications', 'org.freedesktop.Notifications', 'ActionInvoked', 'us', [shown[0]!.id, 'allow']));
      // (Later notifications may be the same alert regrouped, "blocked N×": the answer is the one that says Allowed.)
      await until('the answer to Allow', () => shown.some((s) => s.summary.startsWith('Allowed')), { timeoutMs: 60_000 });
      expect(shown.filter((s) => s.summary.startsWith('Allowed')).map((s) => s.summary)).toEqual([`Allowed firefox → ${DEST}`]);
      await until('the re-apply logged', () => log.filter((l) => l.event === 'applied').length > applies);
      expect(log.filter((l) => l.event === 'applied').length).toBe(applies + 1);
      expect(polkit.asked.slice(asked)).toEqual([
        {
          action: 'org.egressd.allow-from-denial',
          uid: users.app1.uid,
          details: expect.objectContaining({ app: 'firefox', destinations: DEST, ports: String(PORT), proto: 'tcp', 'record.uid': String(users.app1.uid) }),
        },
      ]);
      const dropIn = readFileSync(join(dir, DROP_IN), 'utf8');
      expect(dropIn).toMatch(/- app: "firefox"\n {4}allow: \["203\.0\.113\.1"\]\n {4}ports: \[8443\]\n {4}proto: tcp\n {4}until: /);
      // The record the agent allowed from is one the store holds for this user, under the id the Denied signal carried.
      const allowedFrom = Number(/from denial record (\d+) \(rule (r[0-9a-f]{8})/.exec(dropIn)?.[1]);
      expect(watcher.lines.filter((l) => l.denied !== undefined).map((l) => l.id)).toContain(allowedFrom);
      expect(await root.queryDenials({ uid: users.app1.uid })).toContainEqual(
        expect.objectContaining({ id: allowedFrom, shortId, app: 'firefox', address: DEST, port: PORT }),
      );

      expect(await tcp(users.app1.uid, PORT, 2000)).toMatchObject({ ok: true });
      const duringAttempts = { otherUser: otherUser.progress().attempts, otherPort: otherPort.progress().attempts };
      expect(await tcp(users.app2.uid)).toMatchObject({ ok: false });
      expect(await tcp(users.app1.uid, OTHER_PORT)).toMatchObject({ ok: false });

      // The probes stop by themselves; they ran across the re-apply and none got through.
      const [userTotals, portTotals] = await Promise.all([otherUser.done(), otherPort.done()]);
      expect(userTotals.attempts).toBeGreaterThan(duringAttempts.otherUser);
      expect(portTotals.attempts).toBeGreaterThan(duringAttempts.otherPort);
      expect(userTotals.successes).toBe(0);
      expect(portTotals.successes).toBe(0);
      // The server saw exactly the one allowed connection.
      const seen = await servers.allowed.seen();
      expect(seen).toHaveLength(1);
      expect(seen[0]!.bytes).toBe('hi\n'.length);
      expect(await servers.other.count()).toBe(0);
    } finally {
      await Promise.all(loops.map((l) => l.stop()));
      watcher?.stop();
      root?.close();
      agent.kill('SIGTERM');
      session.disconnect();
    }
  }, 240_000);
});
