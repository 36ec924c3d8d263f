import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { deleteNamedNetns } from '../../src/lab/sys.js';
import { nftAvailable } from '../support/nft-check.js';
import { openNotifySocket, type NotifyMessage, type NotifySocket } from '../support/notify-socket.js';

/** egressd under Type=notify, with a notify socket of this test's own, in a namespace of its own. */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = nftAvailable();
const ns = `egd-ntf-${randomBytes(3).toString('hex')}`;
const dir = mkdtempSync(join(tmpdir(), 'egd-notify-policy-'));
const broken = mkdtempSync(join(tmpdir(), 'egd-notify-broken-'));
const state = mkdtempSync(join(tmpdir(), 'egd-notify-state-'));

const nft = (...args: string[]) => spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'nft', ...args], { encoding: 'utf8' });
const digest = () => /policy sha256:([0-9a-f]{32})/.exec(nft('list', 'table', 'inet', 'egressd').stdout)?.[1];
const has = (key: string, value?: string) => (m: NotifyMessage) => m.fields.get(key) === (value ?? '1');

interface Run {
  readonly child: ChildProcess;
  readonly events: { event: string; level: string; digest?: string }[];
  readonly exited: Promise<number | null>;
}

function start(policy: string, env: NodeJS.ProcessEnv): Run {
  const child = spawn(
    'nsenter',
    [
      `--net=/run/netns/${ns}`,
      process.execPath,
      '--import',
      'tsx',
      join(ROOT, 'src/daemon/main.ts'),
      '--policy',
      policy,
      '--state',
      state,
      '--no-apps',
      '--no-denials',
      '--no-denial-store',
      '--no-dbus',
      '--no-tor',
    ],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => !['NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID'].includes(k))), ...env },
    },
  );
  const events: Run['events'] = [];
  createInterface({ input: child.stdout }).on('line', (text) => events.push(JSON.parse(text) as Run['events'][number]));
  return { child, events, exited: new Promise((resolve) => child.once('exit', (code) => resolve(code))) };
}

describe.skipIf(skip)(`egressd Type=notify ${skip ? `(skipped: ${skip})` : ''}`, () => {
  const sockets: NotifySocket[] = [];
  const runs: Run[] = [];

  beforeAll(() => {
    spawnSync('ip', ['netns', 'add', ns]);
    spawnSync('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
    writeFileSync(join(dir, '00.yaml'), 'deny:\n  - to: [203.0.113.0/24]\ndns: {upstreams: ["192.0.2.53"]}\n');
    writeFileSync(join(broken, '00.yaml'), 'deny: [{to: [192.0.2.1/24]}]\ndns: {upstreams: ["192.0.2.53"]}\n');
  });
  afterAll(() => {
    for (const run of runs) run.child.kill('SIGKILL');
    for (const socket of sockets) socket.close();
    deleteNamedNetns(ns);
    for (const d of [dir, broken, state]) rmSync(d, { recursive: true, force: true });
  });

  it('READY=1 once the table is enforced, RELOADING=1 … READY=1 around SIGHUP, STOPPING=1 at SIGTERM, watchdog pings', async () => {
    const socket = await openNotifySocket();
    sockets.push(socket);
    // What the table was at the moment READY=1 arrived, not once the test gets round to looking.
    let tableAtReady: string | undefined | null = null;
    const readyAndTable = socket.next((m) => {
      if (!has('READY')(m)) return false;
      tableAtReady ??= digest();
      return true;
    });
    const run = start(dir, { NOTIFY_SOCKET: socket.address, WATCHDOG_USEC: '400000' });
    runs.push(run);
    const ready = await readyAndTable;
    expect(tableAtReady).toMatch(/^[0-9a-f]{32}$/);
    const status =
      /^enforcing policy sha256:([0-9a-f]{12})… \((\d+) rules\), resolver on 127\.0\.0\.153, ::1, apps off, denials off, denial-store off, dbus off, tor off$/.exec(
        ready.fields.get('STATUS') ?? '',
      );
    expect(status?.[1], ready.fields.get('STATUS')).toBe(tableAtReady!.slice(0, 12));
    const rules = Number(status![2]);
    // Nothing said READY before it; the apply was logged before it was told.
    expect(socket.messages.slice(0, socket.messages.indexOf(ready)).filter(has('READY'))).toEqual([]);
    expect(run.events.some((e) => e.event === 'applied')).toBe(true);

    // Every 200 ms (half of WATCHDOG_USEC).
    await socket.next(has('WATCHDOG'), socket.messages.indexOf(ready) + 1);
    expect(socket.messages.filter(has('WATCHDOG')).length).toBeGreaterThanOrEqual(2);

    // A good re-apply: the new policy is in force when READY=1 comes back.
    const old = digest();
    writeFileSync(join(dir, '10-more.yaml'), 'deny:\n  - to: ["2001:db8:bad::/48"]\n');
    let from = socket.messages.length;
    run.child.kill('SIGHUP');
    const reloading = await socket.next(has('RELOADING'), from);
    expect(reloading.fields.get('STATUS')).toBe('re-applying: SIGHUP');
    expect(reloading.fields.get('MONOTONIC_USEC')).toMatch(/^\d+$/);
    let tableAtReload: string | undefined;
    const reloaded = await socket.next((m) => has('READY')(m) && (tableAtReload ??= digest()) !== undefined, socket.messages.indexOf(reloading) + 1);
    expect(tableAtReload).not.toBe(old);
    expect(reloaded.fields.get('STATUS')).toBe(
      `enforcing policy sha256:${tableAtReload!.slice(0, 12)}… (${rules + 1} rules), resolver on 127.0.0.153, ::1, apps off, denials off, denial-store off, dbus off, tor off`,
    );

    // A broken one: the reload ends (READY=1) and says the old table holds.
    writeFileSync(join(dir, '20-broken.yaml'), 'deny: [{to: [192.0.2.1/24]}]\n');
    from = socket.messages.length;
    run.child.kill('SIGHUP');
    const after = await socket.next(has('RELOADING'), from);
    const failed = await socket.next(has('READY'), socket.messages.indexOf(after) + 1);
    // Every error, with its file:line:col, is in the STATUS systemctl shows.
    expect(failed.fields.get('STATUS')).toBe(
      `apply failed: 1 error in the policy (${join(dir, '20-broken.yaml')}:1:14: "192.0.2.1/24" has host bits set below the /24 prefix (at deny[0].to[0]) (did you mean 192.0.2.0/24?)); previous table stays in force`,
    );
    expect(digest()).toBe(tableAtReload);
    rmSync(join(dir, '20-broken.yaml'));

    from = socket.messages.length;
    run.child.kill('SIGTERM');
    const stopping = await socket.next(has('STOPPING'), from);
    expect(stopping.fields.get('STATUS')).toBe('stopping (SIGTERM); the rules stay in force');
    expect(await run.exited).toBe(0);
    expect(run.events.some((e) => e.event === 'notify-failed')).toBe(false);
  });

  it('a first apply that fails with a table from before in force is READY, saying so (abstract socket)', async () => {
    expect(digest()).toBeDefined();
    // An abstract socket belongs to its network namespace: the receiver lives in the daemon's.
    const socket = await openNotifySocket({ abstract: true, wrap: ['nsenter', `--net=/run/netns/${ns}`] });
    sockets.push(socket);
    const run = start(broken, { NOTIFY_SOCKET: socket.address });
    runs.push(run);
    const ready = await socket.next(has('READY'));
    expect(ready.fields.get('STATUS')).toBe(
      `apply failed: 1 error in the policy (${join(broken, '00.yaml')}:1:14: "192.0.2.1/24" has host bits set below the /24 prefix (at deny[0].to[0]) (did you mean 192.0.2.0/24?)); previous table stays in force`,
    );
    run.child.kill('SIGTERM');
    await socket.next(has('STOPPING'));
    expect(await run.exited).toBe(0);
  });

  it('a notify socket nobody holds is logged once and changes nothing else', async () => {
    const run = start(dir, { NOTIFY_SOCKET: join(state, 'nobody-listens') });
    runs.push(run);
    const deadline = Date.now() + 20_000;
    while (!run.events.some((e) => e.event === 'applied') && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    expect(run.events.some((e) => e.event === 'applied')).toBe(true);
    run.child.kill('SIGHUP');
    while (run.events.filter((e) => e.event === 'applied').length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
    run.child.kill('SIGTERM');
    expect(await run.exited).toBe(0);
    expect(run.events.filter((e) => e.event === 'notify-failed')).toHaveLength(1);
    expect(run.events.filter((e) => e.event === 'applied')).toHaveLength(2);
  });
});
