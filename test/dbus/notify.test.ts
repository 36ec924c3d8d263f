import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import dbus from 'dbus-next';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { ReloadOutcome } from '../../src/daemon/part.js';
import { DROP_IN } from '../../src/dbus/allow.js';
import { startFirewallService, type FirewallService } from '../../src/dbus/service.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { ensureTestUsers, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { dbusUnavailable, denial, MemoryStore, quietLog, ROOT, startBuses, TestFeed, type Buses } from './support.js';

const skip = dbusUnavailable();

interface Shown {
  appName: string;
  replacesId: number;
  summary: string;
  body: string;
  actions: string[];
  id: number;
}

/** org.freedesktop.Notifications as the test's own server on the session bus: records every Notify, emits ActionInvoked on demand. */
async function notificationServer(address: string) {
  const bus = dbus.sessionBus({ busAddress: address });
  await new Promise((r) => bus.once('connect', r));
  const shown: Shown[] = [];
  let next = 100;
  bus.addMethodHandler((msg: InstanceType<typeof dbus.Message>) => {
    if (msg.path !== '/org/freedesktop/Notifications') return false;
    if (msg.member === 'GetServerInformation') bus.send(dbus.Message.newMethodReturn(msg, 'ssss', ['test', 'egressd-tests', '1', '1.2']));
    else if (msg.member === 'Notify') {
      const [appName, replacesId, , summary, body, actions] = msg.body as [string, number, string, string, string, string[]];
      const id = replacesId || ++next;
      shown.push({ appName, replacesId, summary, body, actions, id });
      bus.send(dbus.Message.newMethodReturn(msg, 'u', [id]));
    } else return false;
    return true;
  });
  await bus.requestName('org.freedesktop.Notifications', 0);
  return {
    shown,
    invoke(id: number, key: string) {
      bus.send(dbus.Message.newSignal('/org/freedesktop/Notifications', 'org.freedesktop.Notifications', 'ActionInvoked', 'us', [id, key]));
    },
    close: () => bus.disconnect(),
  };
}

interface RunningAgent {
  out: string;
  err: string;
  child: ChildProcess;
  waitFor(what: () => boolean, label: string, ms?: number): Promise<void>;
}

function startAgent(user: { uid: number; gid: number }, env: Record<string, string | undefined>, args: string[]): RunningAgent {
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
      'notify',
      ...args,
    ],
    {
      cwd: ROOT,
      env: Object.fromEntries<string>(Object.entries({ PATH: process.env['PATH'], ...env }).filter((e): e is [string, string] => e[1] !== undefined)),
    },
  );
  const agent: RunningAgent = {
    out: '',
    err: '',
    child,
    async waitFor(what, label, ms = 40_000) {
      const end = Date.now() + ms;
      while (!what()) {
        if (Date.now() > end) throw new Error(`timed out waiting for ${label}; stdout: ${agent.out}; stderr: ${agent.err}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
  };
  child.stdout.on('data', (d: Buffer) => (agent.out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (agent.err += d.toString()));
  return agent;
}

const settle = (ms = 500) => new Promise((r) => setTimeout(r, ms));

describe.skipIf(skip)(`egressctl notify against real buses and a test notification server ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let buses: Buses;
  let users: TestUsers;
  let service: FirewallService;
  let server: Awaited<ReturnType<typeof notificationServer>>;
  let dir: string;
  let configDir: string;
  const store = new MemoryStore();
  const feed = new TestFeed();
  const reloads: string[] = [];
  const agents: RunningAgent[] = [];

  const config = (name: string, text: string) => {
    const path = join(configDir, name);
    writeFileSync(path, text);
    chmodSync(path, 0o644);
    return path;
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    buses = await startBuses();
    configDir = mkdtempSync(join(tmpdir(), 'egd-notify-'));
    chmodSync(configDir, 0o755);
    dir = policyDir(
      {
        '10-phone-home.yaml': 'deny:\n  - to: [telemetry.example.org]\n',
        '30-apps.yaml': 'apps:\n  firefox:\n    identity: {user: egd-app1}\n',
      },
      { keep: true },
    );
    feed.subscribe((r) => store.add([r]));
    service = await startFirewallService({
      busAddress: buses.system,
      status: () => ({ state: 'enforcing', digest: 'd', lockdown: false, parts: [] }),
      reload: async (why): Promise<ReloadOutcome> => {
        reloads.push(why);
        const loaded = loadPolicyDir(dir);
        return loaded.ok
          ? { applied: true, digest: loaded.policy.digest }
          : { applied: false, code: 'EGD_POLICY_INVALID', errors: loaded.errors.map((e) => e.message) };
      },
      policyDir: dir,
      store,
      feed,
      log: quietLog(),
    });
    server = await notificationServer(buses.session);
  }, 30_000);
  afterAll(async () => {
    for (const a of agents) a.child.kill('SIGTERM');
    server?.close();
    await service?.close();
    buses?.stop();
  });

  const env = () => ({ DBUS_SYSTEM_BUS_ADDRESS: buses.system, DBUS_SESSION_BUS_ADDRESS: buses.session, HOME: '/nonexistent' });
  const mine = (uid: number) => server.shown.filter((s) => s.summary.includes(`uid${uid}-`) || s.body.includes(`uid${uid}-`));

  it("a user's agent shows only that user's denials, grouped in place, rate-limited, muted apps never; Allow is refused for the user and says so", async () => {
    const path = config('app1.yaml', 'groupSeconds: 60\nmaxPerMinute: 2\nmute: [muted]\nallowScope: 1h\n');
    const agent = startAgent(users.app1, env(), ['--config', path]);
    agents.push(agent);
    await agent.waitFor(() => agent.err.includes(`listening for denials of uid ${users.app1.uid}`), 'the agent to listen');
    const before = server.shown.length;
    const tag = `uid${users.app1.uid}-`;
    // Three packets of one app, destination and rule: one notification, updated in place.
    for (let i = 0; i < 3; i++) feed.emit(denial({ uid: users.app1.uid, app: 'firefox', name: `${tag}telemetry.example.org` }));
    await agent.waitFor(() => server.shown.length >= before + 3, 'three Notify calls');
    const group = server.shown.slice(before, before + 3);
    expect(group.map((s) => s.replacesId)).toEqual([0, group[0]!.id, group[0]!.id]);
    expect(group[2]).toMatchObject({
      appName: 'egressd',
      summary: `firefox tried to reach ${tag}telemetry.example.org`,
      body: 'blocked 3×, rule deny/10-phone-home.yaml/0 at 10-phone-home.yaml:23',
      actions: ['allow', 'Allow for 1h'],
    });
    // Another user's denial and a muted app's never reach this agent's desktop.
    feed.emit(denial({ uid: users.app2.uid, app: 'firefox', name: `${tag}not-mine.example.org` }));
    feed.emit(denial({ uid: users.app1.uid, app: 'muted', name: `${tag}muted.example.org` }));
    // Rate limit: 2 new notifications a minute; the group above was the first.
    feed.emit(denial({ uid: users.app1.uid, app: 'firefox', name: `${tag}second.example.org` }));
    feed.emit(denial({ uid: users.app1.uid, app: 'firefox', name: `${tag}third.example.org` }));
    await settle(1000);
    const names = server.shown.slice(before).map((s) => s.summary);
    expect(names.filter((n) => n.includes('not-mine') || n.includes('muted'))).toEqual([]);
    expect(names.filter((n) => n.includes('second'))).toHaveLength(1);
    expect(names.filter((n) => n.includes('third'))).toHaveLength(0);

    // Allow: the daemon refuses this user (no polkit here); the notification says so and nothing is written.
    const count = server.shown.length;
    server.invoke(group[0]!.id, 'allow');
    await agent.waitFor(() => server.shown.length > count, 'the answer to Allow');
    expect(server.shown[count]).toMatchObject({ replacesId: group[0]!.id, summary: `Not allowed: firefox → ${tag}telemetry.example.org`, actions: [] });
    expect(server.shown[count]!.body).toContain('AllowFromDenial: not allowed for uid');
    expect(existsSync(join(dir, DROP_IN))).toBe(false);
    expect(mine(users.app1.uid).length).toBeGreaterThan(0);
  }, 120_000);

  it("root's Allow from the notification writes the drop-in and reloads; an invoked action of another notification or key does nothing", async () => {
    const path = config('root.yaml', 'allowScope: always\n');
    const agent = startAgent({ uid: 0, gid: 0 }, env(), ['--config', path]);
    agents.push(agent);
    await agent.waitFor(() => agent.err.includes('listening for denials of uid 0'), 'the root agent to listen');
    const before = server.shown.length;
    feed.emit(denial({ uid: 0, app: 'firefox', name: 'telemetry.example.org' }));
    await agent.waitFor(() => server.shown.length > before, 'the notification');
    const shown = server.shown[before]!;
    expect(shown.actions).toEqual(['allow', 'Allow always']);
    server.invoke(shown.id, 'dismiss');
    server.invoke(999_999, 'allow');
    await settle(500);
    expect(existsSync(join(dir, DROP_IN))).toBe(false);
    const reloadsBefore = reloads.length;
    server.invoke(shown.id, 'allow');
    await agent.waitFor(() => server.shown.length > before + 1, 'the answer to Allow');
    expect(server.shown[before + 1]).toMatchObject({ replacesId: shown.id, summary: 'Allowed firefox → telemetry.example.org', body: 'always' });
    expect(reloads.length).toBe(reloadsBefore + 1);
    const text = readFileSync(join(dir, DROP_IN), 'utf8');
    expect(text).toContain('allow: ["telemetry.example.org"]');
    expect(text).toContain(`from denial record ${store.rows[store.rows.length - 1]!.id} (rule r0a1b2c3d`);
  }, 120_000);

  it('quiet hours hold notifications back (the record still arrives: --follow prints it); with no session bus the agent prints', async () => {
    const nowDate = new Date();
    const hh = (d: Date) => `${String(d.getHours()).padStart(2, '0')}:${String(d.getMinutes()).padStart(2, '0')}`;
    const quiet = `${hh(new Date(nowDate.getTime() - 3_600_000))}-${hh(new Date(nowDate.getTime() + 3_600_000))}`;
    const path = config('app2.yaml', `quietHours: "${quiet}"\n`);
    const agent = startAgent(users.app2, env(), ['--config', path, '--follow']);
    agents.push(agent);
    await agent.waitFor(() => agent.err.includes(`listening for denials of uid ${users.app2.uid}`), 'the quiet agent to listen');
    const before = server.shown.length;
    feed.emit(denial({ uid: users.app2.uid, app: 'firefox', name: 'quiet.example.org', address: '203.0.113.44' }));
    await agent.waitFor(() => agent.out.includes('quiet.example.org'), 'the --follow line');
    await settle(500);
    expect(server.shown.length).toBe(before);
    expect(agent.out).toMatch(
      /^\d\d:\d\d:\d\d firefox → quiet\.example\.org \(203\.0\.113\.44\) tcp\/443 blocked 1× rule deny\/10-phone-home\.yaml\/0 at 10-phone-home\.yaml:23 \[record \d+\]$/m,
    );

    const bare = startAgent(users.app3, { ...env(), DBUS_SESSION_BUS_ADDRESS: undefined }, ['--config', '/nonexistent/notify.yaml']);
    agents.push(bare);
    await bare.waitFor(() => bare.err.includes('(no desktop)'), 'the bare agent to listen');
    expect(bare.err).toContain('no session bus (DBUS_SESSION_BUS_ADDRESS is not set); printing denials here');
    feed.emit(denial({ uid: users.app3.uid, app: undefined, kind: 'default', name: undefined, address: '198.51.100.9', port: 80 }));
    await bare.waitFor(() => bare.out.includes('198.51.100.9'), 'the terminal line');
    expect(bare.out).toContain(`uid ${users.app3.uid} → 198.51.100.9 tcp/80 blocked 1×`);
  }, 120_000);

  it('a bad config file is a clear error naming the key, exit 2', async () => {
    const path = config('bad.yaml', 'maxPerMinute: lots\nquietHours: "25:00-07:00"\nsnooze: true\n');
    const agent = startAgent(users.app1, env(), ['--config', path]);
    const code = await new Promise<number | null>((r) => agent.child.on('exit', r));
    expect(code).toBe(2);
    expect(agent.err).toContain(`${path}: 3 problems`);
    expect(agent.err).toContain(`${path}: maxPerMinute: `);
    expect(agent.err).toContain(`${path}: quietHours: quiet hours are written "22:00-07:00"`);
    expect(agent.err).toMatch(/Unrecognized key: "snooze"|snooze/);
  }, 30_000);
});
