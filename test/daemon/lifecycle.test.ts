import { spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { openNotifySocket, type NotifyMessage, type NotifySocket } from '../support/notify-socket.js';
import { printed, until } from '../support/wait.js';

/**
 * egressd's life in the namespace harness, told by what systemd would be
 * told (a notify socket of the test's own) and checked by what reaches the
 * internet side: READY only with the table in force, reloads good and
 * broken, SIGKILL and a restart under a flood of denied packets, a hundred
 * reloads under traffic, and a part that keeps crashing.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const MAIN = join(ROOT, 'src/daemon/main.ts');
const WITH_CRASHER = join(import.meta.dirname, 'fixtures', 'egressd-with-crasher.ts');
const unavailable = harnessUnavailableReason();

let net: TestNet;
let users: TestUsers;
let servers: { denied: Server; allowed: Server; lines: Server };
let dir: string;
let state: string;

/** A udp port the policy denies, a tcp port it allows, on the same address: only the policy tells them apart. */
function policy(variant: 'a' | 'b'): string {
  return `defaults: {egress: allow}
deny:
  - to: [192.0.2.2${variant === 'b' ? ', 198.51.100.0/25' : ''}]
    ports: [5353]
    proto: udp
dns: {upstreams: ["192.0.2.53"]}
`;
}

const has =
  (key: string, value = '1') =>
  (m: NotifyMessage) =>
    m.fields.get(key) === value;

/** The table's policy digest, read synchronously (inside a notify matcher: what holds at the moment the message arrived). */
function digest(): string | undefined {
  const listed = spawnSync('nsenter', [`--net=/run/netns/${net.host.netns}`, 'nft', 'list', 'table', 'inet', 'egressd'], { encoding: 'utf8' });
  return /policy sha256:([0-9a-f]{32})/.exec(listed.stdout)?.[1];
}

/** The whole ruleset without counters (-s): what a flood changes is only them. */
/** The ruleset without state: counters (-s) and what the kernel itself adds to the log meters (lograte_*: an entry per sending uid, which a flood fills). */
function ruleset(): string {
  const listed = spawnSync('nsenter', [`--net=/run/netns/${net.host.netns}`, 'nft', '-s', '-j', 'list', 'ruleset'], { encoding: 'utf8' }).stdout;
  if (!listed) return listed;
  const parsed = JSON.parse(listed) as { nftables: Record<string, { name?: string; elem?: unknown }>[] };
  for (const item of parsed.nftables) if (item['set']?.name?.startsWith('lograte_')) delete item['set'].elem;
  return JSON.stringify(parsed);
}

interface LogLine {
  event: string;
  level: string;
  time: string;
  errors?: string[];
  part?: string;
  phase?: string;
  restarts?: number;
  retryInMs?: number;
  state?: string;
}

interface Daemon {
  readonly child: ChildProcess;
  readonly lines: LogLine[];
  readonly exited: Promise<number | null>;
  events(event: string): LogLine[];
}

function startDaemon(socket: NotifySocket, entry = MAIN, extra: readonly string[] = []): Daemon {
  const env = {
    ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !['WATCHDOG_USEC', 'WATCHDOG_PID'].includes(k))),
    NOTIFY_SOCKET: socket.address,
  };
  // The app tracker, the denial path, the D-Bus service and Tor's status are off unless a test asks for the default parts (`'default-parts'` first in `extra`): the STATUS lines below are the resolver's.
  const parts = extra[0] === 'default-parts' ? extra.slice(1) : ['--no-apps', '--no-denials', '--no-denial-store', '--no-dbus', '--no-tor', ...extra];
  const child = net.host.spawn(process.execPath, ['--import', 'tsx', entry, '--policy', dir, '--state', state, ...parts], { env });
  const lines: LogLine[] = [];
  createInterface({ input: child.stdout! }).on('line', (text) => lines.push(JSON.parse(text) as LogLine));
  child.stderr!.on('data', (chunk: Buffer) => process.stderr.write(chunk));
  return {
    child,
    lines,
    exited: new Promise((resolve) => child.once('exit', (code) => resolve(code))),
    events: (event) => lines.filter((l) => l.event === event),
  };
}

/** Waits for READY=1 from `from` on, and returns it with the digest in force at the moment it came. */
async function ready(socket: NotifySocket, from: number, timeoutMs = 20_000): Promise<{ message: NotifyMessage; table: string | undefined }> {
  let table: string | undefined | null = null;
  const message = await socket.next(
    (m) => {
      if (!has('READY')(m)) return false;
      table ??= digest();
      return true;
    },
    from,
    timeoutMs,
  );
  return { message, table: table ?? undefined };
}

describe.skipIf(unavailable)(`egressd's life ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  const sockets: NotifySocket[] = [];
  const daemons: Daemon[] = [];
  const socket = async () => {
    const s = await openNotifySocket();
    sockets.push(s);
    return s;
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    dir = mkdtempSync(join(tmpdir(), 'egd-life-policy-'));
    state = mkdtempSync(join(tmpdir(), 'egd-life-state-'));
    writeFileSync(join(dir, '00.yaml'), policy('a'));
    servers = {
      denied: await net.inet.listen({ proto: 'udp', addr: '192.0.2.2', port: 5353 }),
      allowed: await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 8443 }),
      lines: await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 8444, lines: true }),
    };
  });
  afterAll(async () => {
    for (const d of daemons) d.child.kill('SIGKILL');
    for (const s of sockets) s.close();
    await net?.destroy();
    for (const d of [dir, state]) if (d) rmSync(d, { recursive: true, force: true });
  });
  beforeEach(async () => {
    // What one test leaves broken does not fail the next.
    for (const broken of ['10-broken.yaml', '20-broken.yaml']) rmSync(join(dir, broken), { force: true });
    for (const server of Object.values(servers ?? {})) await server.reset();
  });

  // 1 ms apart: with none, the sender's loop stopped reporting after a few thousand EPERMs (seen here), and a stalled flood proves nothing.
  const flood = () =>
    net.host.sendLoop({
      proto: 'udp',
      addr: '192.0.2.2',
      port: 5353,
      user: users.app1.uid,
      count: 10_000_000,
      intervalMs: 1,
      attemptTimeoutMs: 5,
      maxMs: 170_000,
    });

  it('READY=1 comes with the table in force; a broken policy on SIGHUP keeps it and tells every error with file:line; a good one replaces it', async () => {
    const notify = await socket();
    const daemon = startDaemon(notify);
    daemons.push(daemon);
    const first = await ready(notify, 0);
    expect(first.table).toMatch(/^[0-9a-f]{32}$/);
    expect(first.message.fields.get('STATUS')).toMatch(
      /^enforcing policy sha256:[0-9a-f]{12}… \(\d+ rules\), resolver on 127\.0\.0\.153, ::1, apps off, denials off, denial-store off, dbus off, tor off$/,
    );
    expect(daemon.events('applied')).toHaveLength(1);

    // Broken: two errors in two files.
    const before = ruleset();
    writeFileSync(join(dir, '10-broken.yaml'), 'deny: [{to: [192.0.2.1/24]}]\n');
    writeFileSync(join(dir, '20-broken.yaml'), 'deny:\n  - to: [203.0.113.1]\n    ports: [70000]\n');
    let from = notify.messages.length;
    daemon.child.kill('SIGHUP');
    const failed = await ready(notify, from);
    expect(failed.table).toBe(first.table);
    expect(ruleset()).toBe(before);
    const status = failed.message.fields.get('STATUS')!;
    expect(status).toMatch(/^apply failed: 2 errors in the policy \(.*\); previous table stays in force$/);
    expect(status).toContain(`${join(dir, '10-broken.yaml')}:1:14: "192.0.2.1/24" has host bits set`);
    expect(status).toContain(`${join(dir, '20-broken.yaml')}:3:13: Too big: expected number to be <=65535`);
    await until('apply-failed logged', () => daemon.events('apply-failed').length > 0);
    const logged = daemon.events('apply-failed');
    expect(logged).toHaveLength(1);
    expect(logged[0]!.errors).toHaveLength(2);
    expect(logged[0]!.errors!.join('\n')).toContain(`${join(dir, '10-broken.yaml')}:1:14:`);
    expect(logged[0]!.errors!.join('\n')).toContain(`${join(dir, '20-broken.yaml')}:3:13:`);
    await until('degraded', () => daemon.events('state-changed').at(-1)?.state === 'degraded');

    // Good again: a new table, enforcing.
    rmSync(join(dir, '10-broken.yaml'));
    rmSync(join(dir, '20-broken.yaml'));
    writeFileSync(join(dir, '00.yaml'), policy('b'));
    from = notify.messages.length;
    daemon.child.kill('SIGHUP');
    const replaced = await ready(notify, from);
    expect(replaced.table).toMatch(/^[0-9a-f]{32}$/);
    expect(replaced.table).not.toBe(first.table);
    const rules = /\((\d+) rules\)/.exec(first.message.fields.get('STATUS')!)![1];
    expect(replaced.message.fields.get('STATUS')).toBe(
      `enforcing policy sha256:${replaced.table!.slice(0, 12)}… (${rules} rules), resolver on 127.0.0.153, ::1, apps off, denials off, denial-store off, dbus off, tor off`,
    );
    await until('enforcing', () => daemon.events('state-changed').at(-1)?.state === 'enforcing');
  }, 60_000);

  it('SIGKILL under a flood of denied packets: none reaches the server, the table stays; a restart leaves no window', async () => {
    const daemon = daemons.at(-1)!;
    // The signal goes to egressd itself, not to a wrapper that would leave it running.
    expect(readlinkSync(`/proc/${daemon.child.pid}/exe`)).toBe(readlinkSync(`/proc/${process.pid}/exe`));
    const held = digest();
    const before = ruleset();
    const denied = flood();
    await until('the flood runs', () => denied.progress.attempts > 200);
    daemon.child.kill('SIGKILL');
    expect(await daemon.exited).toBe(null);
    const atKill = denied.progress.attempts;
    await until('the flood goes on after the kill', () => denied.progress.attempts > atKill + 1000, { timeoutMs: 30_000 });
    expect(ruleset()).toBe(before);

    // The new egressd re-applies the same policy, by the generation swap, while the flood runs.
    const notify = await socket();
    const again = startDaemon(notify);
    daemons.push(again);
    const back = await ready(notify, 0);
    expect(back.table).toBe(held);
    const atReady = denied.progress.attempts;
    await until('the flood goes on after READY', () => denied.progress.attempts > atReady + 1000, { timeoutMs: 30_000 });
    const sent = await denied.stop();
    expect(again.events('applied')).toHaveLength(1);
    expect(sent.successes).toBe(0);
    expect(await servers.denied.count()).toBe(0);
  }, 90_000);

  it('a hundred reloads in a row under traffic: no denied packet passes, no allowed connection breaks, each within its bound', async () => {
    const daemon = daemons.at(-1)!;
    const notify = sockets.at(-1)!;
    const denied = flood();
    // 900 ms per attempt: a SYN lost to a swap is resent only after 1 s, so it would show as a failure.
    const allowed = net.host.sendLoop({ proto: 'tcp', addr: '192.0.2.2', port: 8443, count: 1_000_000, intervalMs: 5, attemptTimeoutMs: 900, maxMs: 170_000 });
    const session = await net.host.session({ addr: '192.0.2.2', port: 8444 });
    expect(session.connected).toBe(true);
    const appliedBefore = daemon.events('applied').length;
    const took: number[] = [];
    const echoes: boolean[] = [];
    for (let i = 0; i < 100; i++) {
      writeFileSync(join(dir, '00.yaml'), policy(i % 2 === 0 ? 'a' : 'b'));
      const from = notify.messages.length;
      const started = performance.now();
      daemon.child.kill('SIGHUP');
      const done = await ready(notify, from, 10_000);
      took.push(performance.now() - started);
      expect(done.message.fields.get('STATUS'), `reload ${i}`).toMatch(/^enforcing policy/);
      if (i % 10 === 9) echoes.push(await session.send(`after reload ${i}`));
    }
    const floods = await denied.stop();
    const connects = await allowed.stop();
    await session.close();
    expect(daemon.events('applied').length - appliedBefore).toBe(100);
    expect(daemon.events('apply-failed')).toHaveLength(0);
    expect(floods.attempts).toBeGreaterThan(1000);
    expect(floods.successes).toBe(0);
    expect(await servers.denied.count()).toBe(0);
    expect(connects.attempts).toBeGreaterThan(50);
    expect(connects.errors).toEqual({});
    expect(connects.successes).toBe(connects.attempts);
    expect(echoes).toEqual(Array(10).fill(true));
    expect(Math.max(...took)).toBeLessThan(10_000);
    console.log(
      `100 reloads under traffic: median ${Math.round(took.sort((a, b) => a - b)[50]!)} ms, max ${Math.round(took.at(-1)!)} ms; flood ${floods.attempts} datagrams, ${connects.attempts} allowed connects`,
    );
  }, 180_000);

  it('a part that keeps crashing is restarted with growing back-off and reported, while enforcement and the resolver go on', async () => {
    const old = daemons.at(-1)!;
    old.child.kill('SIGTERM');
    expect(await old.exited).toBe(0);
    writeFileSync(join(dir, '00.yaml'), policy('a'));
    const notify = await socket();
    const daemon = startDaemon(notify, WITH_CRASHER);
    daemons.push(daemon);
    const up = await ready(notify, 0);
    expect(up.message.fields.get('STATUS')).toMatch(
      /, resolver on 127\.0\.0\.153, ::1, crasher up, apps off, denials off, denial-store off, dbus off, tor off$/,
    );
    const denied = flood();
    await until('three restarts', () => daemon.events('part-started').filter((l) => l.part === 'crasher').length >= 4, { timeoutMs: 30_000 });
    const failures = daemon.events('part-failed').filter((l) => l.part === 'crasher');
    expect(failures.length).toBeGreaterThanOrEqual(3);
    expect(failures.every((l) => l.phase === 'stopped' && l.level === 'error')).toBe(true);
    // 0.5 s, 1 s, 2 s, each less up to a quarter.
    const delays = failures.slice(0, 3).map((l) => l.retryInMs!);
    expect(delays[0]).toBeGreaterThanOrEqual(375);
    expect(delays[0]).toBeLessThanOrEqual(500);
    expect(delays[1]).toBeGreaterThanOrEqual(750);
    expect(delays[1]).toBeLessThanOrEqual(1000);
    expect(delays[2]).toBeGreaterThanOrEqual(1500);
    expect(delays[2]).toBeLessThanOrEqual(2000);
    // Each restart came no sooner than its back-off said.
    const starts = daemon.events('part-started').filter((l) => l.part === 'crasher');
    for (let i = 0; i < 3; i++) {
      expect(starts[i + 1]!.restarts).toBe(i + 1);
      expect(Date.parse(starts[i + 1]!.time) - Date.parse(failures[i]!.time)).toBeGreaterThanOrEqual(delays[i]! - 2);
    }
    // Told to systemd between applies, and logged as a state.
    expect(
      notify.messages.some(
        (m) =>
          !m.fields.has('READY') &&
          /, crasher restarting \(\d+ restarts?\), apps off, denials off, denial-store off, dbus off, tor off$/.test(m.fields.get('STATUS') ?? ''),
      ),
    ).toBe(true);
    expect(daemon.events('state-changed').map((l) => l.state)).toContain('degraded');
    // The resolver never went down and still answers; the table never changed; the flood never passed.
    expect(daemon.events('part-failed').filter((l) => l.part === 'resolver')).toEqual([]);
    const dig = await net.host.exec('dig', ['@127.0.0.153', '+tries=1', '+time=2', 'use-application-dns.net', 'A']);
    expect(dig.stdout).toContain('status: NXDOMAIN');
    expect(digest()).toBe(up.table);
    const sent = await denied.stop();
    expect(sent.attempts).toBeGreaterThan(1000);
    expect(sent.successes).toBe(0);
    expect(await servers.denied.count()).toBe(0);
    daemon.child.kill('SIGTERM');
    expect(await daemon.exited).toBe(0);
    expect(digest()).toBe(up.table);
  }, 60_000);

  it('--no-resolver: enforcing without the resolver, and STATUS says it is off', async () => {
    const notify = await socket();
    const daemon = startDaemon(notify, MAIN, ['--no-resolver']);
    daemons.push(daemon);
    const up = await ready(notify, 0);
    expect(up.table).toMatch(/^[0-9a-f]{32}$/);
    expect(up.message.fields.get('STATUS')).toMatch(
      /^enforcing policy sha256:[0-9a-f]{12}… \(\d+ rules\), resolver off, apps off, denials off, denial-store off, dbus off, tor off$/,
    );
    const dig = await net.host.exec('dig', ['@127.0.0.153', '+tries=1', '+time=1', 'use-application-dns.net', 'A']);
    expect(dig.stdout).not.toContain('status: NXDOMAIN');
    expect(daemon.events('resolver-ready')).toEqual([]);
    expect(daemon.events('state-changed').at(-1)?.state).toBe('enforcing');
    daemon.child.kill('SIGTERM');
    expect(await daemon.exited).toBe(0);
  }, 30_000);

  it('the default parts: the app tracker follows cgroupfs and the D-Bus service waits for a system bus, and egressd is enforcing, not degraded', async () => {
    const notify = await socket();
    const daemon = startDaemon(notify, MAIN, ['default-parts']);
    daemons.push(daemon);
    const up = await ready(notify, 0);
    // This machine has no system bus: neither part counts that as failing.
    expect(up.message.fields.get('STATUS')).toMatch(
      /^enforcing policy sha256:[0-9a-f]{12}… \(\d+ rules\), resolver on 127\.0\.0\.153, ::1, apps: \d+ cgroups tracked, \d+ directories watched, systemd signals off, denials: group 7745, \d+ read, \d+ records, 0 lost, denials stored and sent to the log, D-Bus: no system bus yet, updates: direct \(updates over Tor off\)$/,
    );
    await until(
      'the D-Bus part says it waits, and the state is told',
      () => daemon.events('dbus-no-bus').length === 1 && daemon.events('state-changed').length > 0,
      { timeoutMs: 5000 },
    );
    expect(daemon.events('state-changed').at(-1)?.state).toBe('enforcing');
    expect(daemon.events('part-failed')).toEqual([]);
    daemon.child.kill('SIGTERM');
    expect(await daemon.exited).toBe(0);
  }, 30_000);

  it('a resolver that cannot listen (its port taken) is degraded, retried with back-off, and answers once the port is free', async () => {
    const holder = net.host.spawn('/usr/bin/python3', [
      '-c',
      'import socket, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(("127.0.0.153", 53))\nprint("bound", flush=True)\ntime.sleep(600)',
    ]);
    await printed(holder, 'stdout', 'bound');
    const notify = await socket();
    const daemon = startDaemon(notify);
    daemons.push(daemon);
    const up = await ready(notify, 0);
    expect(up.table).toMatch(/^[0-9a-f]{32}$/);
    expect(up.message.fields.get('STATUS')).toMatch(
      /^enforcing policy sha256:[0-9a-f]{12}… \(\d+ rules\), resolver failed \(0 restarts\), apps off, denials off, denial-store off, dbus off, tor off$/,
    );
    await until('a second failed start', () => daemon.events('part-failed').length >= 2);
    expect(daemon.events('part-failed').every((l) => l.part === 'resolver' && l.phase === 'start')).toBe(true);
    expect(daemon.events('state-changed').at(-1)?.state).toBe('degraded');
    holder.kill('SIGKILL');
    const from = notify.messages.length;
    const back = await notify.next(
      (m) =>
        m.fields.get('STATUS') ===
        up.message.fields
          .get('STATUS')!
          .replace(
            /resolver failed \(0 restarts\), apps off, denials off, denial-store off, dbus off, tor off$/,
            'resolver on 127.0.0.153, ::1, apps off, denials off, denial-store off, dbus off, tor off',
          ),
      from,
      20_000,
    );
    expect(back.fields.has('READY')).toBe(false);
    await until('enforcing', () => daemon.events('state-changed').at(-1)?.state === 'enforcing');
    expect(daemon.events('part-started').at(-1)!.restarts).toBeGreaterThanOrEqual(2);
    const dig = await net.host.exec('dig', ['@127.0.0.153', '+tries=1', '+time=2', 'use-application-dns.net', 'A']);
    expect(dig.stdout).toContain('status: NXDOMAIN');
    expect(digest()).toBe(up.table);
    daemon.child.kill('SIGTERM');
    expect(await daemon.exited).toBe(0);
  }, 60_000);
});
