/**
 * egressd the service, side by side with dnsmasq holding the same list:
 *   - egressd on the shipped policies with the 143,876-name tracking list
 *     (a temp policy dir: policies/ with lists/tracking.txt from
 *     /work/shared/data/blocklists/tracking.txt when it is there), its
 *     resolver on: resident memory once READY (VmRSS) and its peak (VmHWM),
 *     from /proc/PID/status; and the time from spawn to READY=1 read from a
 *     notify socket of the bench's own, the median of N runs, both with no
 *     table in force (first boot) and with its own table in force (a restart);
 *   - dnsmasq with the same names as `address=/name/` lines: its memory once
 *     it answers, and the time from spawn to its first answer.
 * Targets: egressd RSS ≤ 120 MB, start to READY ≤ 1.5 s.
 *
 *   npx tsx bench/daemon.ts [--runs 10] [--quick]   (as root; it builds and removes its own namespace)
 *
 * It runs dist/daemon/main.js (the installed form) when `npm run build` made
 * it, else src/daemon/main.ts under tsx, and says which.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { openNotifySocket, type NotifySocket } from '../test/support/notify-socket.js';
import { runInOwnNamespace } from './lib/netns.js';
import { median } from './lib/stats.js';

const { values } = parseArgs({ options: { inner: { type: 'string' }, runs: { type: 'string' }, quick: { type: 'boolean' } } });
const runs = Number(values.runs ?? (values.quick ? 3 : 10));
const ROOT = join(import.meta.dirname, '..');
const LIST = existsSync('/work/shared/data/blocklists/tracking.txt') ? '/work/shared/data/blocklists/tracking.txt' : join(ROOT, 'policies/lists/tracking.txt');
const BUILT = join(ROOT, 'dist/daemon/main.js');

interface Memory {
  readonly hwm: number;
  readonly rss: number;
}

/** Peak and current resident memory in MB, from /proc/PID/status. */
function memory(pid: number): Memory {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? Number.NaN);
  return { hwm: kb('VmHWM') / 1024, rss: kb('VmRSS') / 1024 };
}

function names(): string[] {
  return readFileSync(LIST, 'utf8')
    .split('\n')
    .map((line) => line.trim())
    .filter((line) => line !== '' && !line.startsWith('#'));
}

async function stop(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  if (!(await Promise.race([exited.then(() => true), sleep(5000).then(() => false)]))) {
    child.kill('SIGKILL');
    await exited;
  }
}

interface EgressdRun {
  readonly readyMs: number;
  readonly memory: Memory;
  /** Read again SETTLE_MS after READY (the first run only). */
  readonly settled?: Memory;
}

/** How long the first run is left idle before its memory is read again: V8 gives back the start-up's heap only after a while. */
const SETTLE_MS = 20_000;

async function egressdOnce(socket: NotifySocket, policy: string, state: string, settle = false): Promise<EgressdRun> {
  const entry = existsSync(BUILT) ? [BUILT] : ['--import', 'tsx', join(ROOT, 'src/daemon/main.ts')];
  const from = socket.messages.length;
  const started = performance.now();
  const child = spawn(process.execPath, [...entry, '--policy', policy, '--state', state], {
    stdio: ['ignore', 'ignore', 'inherit'],
    env: { ...process.env, NOTIFY_SOCKET: socket.address },
  });
  try {
    const ready = await socket.next((m) => m.fields.get('READY') === '1', from, 60_000);
    const readyMs = performance.now() - started;
    if (!ready.fields.get('STATUS')?.startsWith('enforcing')) throw new Error(`egressd did not enforce: ${ready.fields.get('STATUS')}`);
    // What it holds while it runs, once the start-up garbage is collectable.
    await sleep(1000);
    const atReady = memory(child.pid!);
    if (!settle) return { readyMs, memory: atReady };
    await sleep(SETTLE_MS - 1000);
    return { readyMs, memory: atReady, settled: memory(child.pid!) };
  } finally {
    await stop(child);
  }
}

async function dnsmasq(dir: string, list: readonly string[]): Promise<{ startMs: number; memory: Memory }> {
  const conf = join(dir, 'dnsmasq.conf');
  writeFileSync(conf, list.map((name) => `address=/${name}/`).join('\n') + '\n');
  const started = performance.now();
  const child = spawn(
    'dnsmasq',
    [
      '--keep-in-foreground',
      `--conf-file=${conf}`,
      '--no-resolv',
      '--no-hosts',
      '--no-poll',
      '--bind-interfaces',
      '--listen-address=127.0.0.1',
      '--port=5353',
      '--user=root',
      '--group=root',
      '--pid-file=',
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  try {
    const probe = list[list.length >> 1]!;
    for (;;) {
      if (child.exitCode !== null) throw new Error('dnsmasq exited');
      const dig = spawnSync('dig', ['@127.0.0.1', '-p', '5353', '+tries=1', '+time=1', probe, 'A'], { encoding: 'utf8' });
      if (dig.stdout.includes('status: NXDOMAIN')) break;
      if (performance.now() - started > 60_000) throw new Error('dnsmasq did not answer within 60 s');
      await sleep(20);
    }
    const startMs = performance.now() - started;
    await sleep(1000);
    return { startMs, memory: memory(child.pid!) };
  } finally {
    await stop(child);
  }
}

async function inner(root: string): Promise<void> {
  spawnSync('ip', ['link', 'set', 'lo', 'up']);
  const policy = join(root, 'policy');
  const state = join(root, 'state');
  cpSync(join(ROOT, 'policies'), policy, { recursive: true });
  copyFileSync(LIST, join(policy, 'lists/tracking.txt'));
  const list = names();
  const socket = await openNotifySocket();
  try {
    const cold: EgressdRun[] = [];
    const warm: EgressdRun[] = [];
    for (let i = 0; i < runs; i++) {
      // No table: the first start on a machine (or after `egressctl release`).
      spawnSync('nft', ['delete', 'table', 'inet', 'egressd']);
      cold.push(await egressdOnce(socket, policy, state, i === 0));
      // Its own table in force: a restart (the apply swaps generations).
      warm.push(await egressdOnce(socket, policy, state));
    }
    const masq = await dnsmasq(root, list);
    const all = [...cold, ...warm];
    const mb = (x: number) => `${x.toFixed(1)} MB`;
    const ms = (x: number) => `${Math.round(x)} ms`;
    const how = existsSync(BUILT) ? 'dist/daemon/main.js' : 'src/daemon/main.ts under tsx';
    const rows: [string, string, string, string][] = [
      ['', 'VmRSS (median)', 'VmHWM (max)', 'start → ready (median)'],
      [
        `egressd, shipped policies, ${list.length.toLocaleString('en')} names, no table`,
        mb(median(cold.map((r) => r.memory.rss))),
        mb(Math.max(...cold.map((r) => r.memory.hwm))),
        ms(median(cold.map((r) => r.readyMs))),
      ],
      [
        'egressd, same, its own table in force (restart)',
        mb(median(warm.map((r) => r.memory.rss))),
        mb(Math.max(...warm.map((r) => r.memory.hwm))),
        ms(median(warm.map((r) => r.readyMs))),
      ],
      [`egressd, first run, ${SETTLE_MS / 1000} s after READY (idle)`, mb(cold[0]!.settled!.rss), mb(cold[0]!.settled!.hwm), ''],
      [`dnsmasq, the same names as address=/name/`, mb(masq.memory.rss), mb(masq.memory.hwm), ms(masq.startMs)],
      ['target (egressd)', '≤ 120 MB', '', '≤ 1500 ms'],
    ];
    const widths = [0, 1, 2, 3].map((i) => Math.max(...rows.map((r) => r[i]!.length)));
    console.log(
      `egressd: ${how}; ${runs} runs of each (start to READY=1 from a notify socket); dnsmasq ${spawnSync('dnsmasq', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0]}`,
    );
    for (const row of rows) console.log(row.map((cell, i) => (i === 0 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join('  '));
    const worst = Math.max(...all.map((r) => r.memory.rss));
    console.log(
      `\nRSS ${worst <= 120 ? 'within' : 'over'} 120 MB one second after READY (worst ${mb(worst)}), ${cold[0]!.settled!.rss <= 120 ? 'within' : 'over'} it idle (${mb(cold[0]!.settled!.rss)}); start to READY ${median(cold.map((r) => r.readyMs)) <= 1500 ? 'within' : 'over'} 1.5 s (cold median)`,
    );
  } finally {
    socket.close();
  }
}

if (values.inner !== undefined) await inner(values.inner);
else {
  const root = mkdtempSync(join(tmpdir(), 'egd-bench-daemon-'));
  const code = runInOwnNamespace(
    'egd-bdmn',
    fileURLToPath(import.meta.url),
    root,
    ['--inner', root, ...(values.quick ? ['--quick'] : []), ...(values.runs ? ['--runs', values.runs] : [])],
    {
      timeoutMs: 600_000,
    },
  );
  process.exit(code);
}
