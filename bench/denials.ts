/**
 * The denial reader under a flood (issue 20), side by side with ulogd2, in a
 * network namespace of its own (created and removed here; nothing touches
 * the machine's own network or ruleset):
 *
 *   A policy (applied with egressctl, state in a temporary directory) denies
 *   everything of one identity (the user `nobody`) and logs it to NFLOG with
 *   a limit far above the flood's rate, so that every dropped packet is
 *   logged: the packets sent are the packets logged. A UDP flood
 *   (test/denials/flood.cjs, one process) from that user goes to 16 addresses
 *   (v4 and v6, routed to a veth) × 4096 ports — 65,536 distinct
 *   destinations — for a fixed time. Then, in turn, each reader binds the
 *   same group:
 *     (1) egressd's reader (src/denials/reader.ts) alone, in this process:
 *         events read per second, records made, events lost (sequence
 *         gaps) and ENOBUFS;
 *     (2) the same reader with the store attached as egressd runs it
 *         (src/denials/store-worker.ts: SQLite in a worker thread, `add`
 *         handed over, a bounded queue that drops and counts): every record
 *         goes to a store in a temporary directory. With 65,536
 *         destinations and at most 10,000 aggregates open, every packet is
 *         a record of its own — the store's worst case. "store dropped" is
 *         what its queue could not take (counted), "store unaccounted" the
 *         events read that are neither in a stored record nor in one
 *         counted dropped (must be 0);
 *     (3) ulogd2 (Debian's) with its SQLITE3 output into a table of the
 *         fields a denial record holds, with SQLite's default journal;
 *     (4) the same with the database in WAL mode;
 *     (5) memory: the reader and the store in a fresh process of their own,
 *         a flood that stops by itself after 1,000,000 packets, then that
 *         process's VmRSS and VmHWM (/proc/PID/status: the worker thread's
 *         heap included).
 *   For ulogd2, stored/s is rows stored over the time from the flood's start
 *   to the last row, and lost is packets logged minus rows stored (worked
 *   out here: ulogd2 does not count it). For egressd, lost is what its
 *   sequence numbers counted, and "unaccounted" what neither it read nor
 *   counted (a loss at the very end shows only in a later packet's number).
 *   The machine's load average is printed with the table: the machine may be
 *   shared, and the numbers move with it.
 *
 *   npx tsx bench/denials.ts [--quick] [--rss-only]   (--rss-only: only the 1,000,000-packet memory row; build first for the daemon's figure)   (as root; `npm run bench -- denials`)
 * --quick floods 2 s per row (a minute or two in all, the 1,000,000-packet row included); the full run 10 s.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import pino from 'pino';
import type { DenialStoreCounters } from '../src/denials/store.js';
import { startDenialStore } from '../src/denials/store-worker.js';
import type { InForce } from '../src/resolver/runtime.js';
import { startDenialReader } from '../src/denials/reader.js';
import { runInOwnNamespace } from './lib/netns.js';

const { values } = parseArgs({
  options: {
    inner: { type: 'string' },
    'rss-only': { type: 'boolean', default: false },
    quick: { type: 'boolean', default: false },
    'rss-compare': { type: 'string', multiple: true, default: [] },
  },
});
const quick = values.quick;
const ROOT = join(import.meta.dirname, '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const FLOOD = join(ROOT, 'test/denials/flood.cjs');
const GROUP = 7799;
const FLOOD_SECONDS = quick ? 2 : 10;
/** How long a reader may take to drain what the flood left queued, at most. */
const DRAIN_SECONDS = quick ? 3 : 10;
const V4 = Array.from({ length: 8 }, (_, i) => `203.0.113.${10 + i}`);
const V6 = Array.from({ length: 8 }, (_, i) => `2001:db8:1::${(10 + i).toString(16)}`);
const PORTS = 4096;
const FLOOD_USER = 'nobody';
/** The memory row: this many packets, then the flood stops by itself (or after RSS_MAX_SECONDS). */
const RSS_EVENTS = 1_000_000;
const RSS_MAX_SECONDS = 120;

interface Row {
  readonly reader: string;
  readonly sent: number;
  readonly read: number;
  readonly readRate: number;
  readonly records: number | undefined;
  readonly stored: number | undefined;
  readonly storedRate: number | undefined;
  /** Records the store did not take (its bounded queue was full, or it failed): counted. */
  readonly storeDropped?: number | undefined;
  /** Events read but neither in a stored record nor in one counted dropped: must be 0. */
  readonly storeUnaccounted?: number | undefined;
  readonly lost: number;
  /** Logged, but neither read nor counted lost (a loss at the very end, which no later sequence number reveals). */
  readonly unaccounted: number | undefined;
  readonly enobufs: number | undefined;
  readonly rssMb: number | undefined;
  /** RSS when the reader was bound, before the flood (the process's own baseline: Node, tsx, pino). */
  readonly rssBeforeMb: number | undefined;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The group is bound (by anyone) once /proc lists it. */
function groupBound(): boolean {
  const text = existsSync('/proc/net/netfilter/nfnetlink_log') ? readFileSync('/proc/net/netfilter/nfnetlink_log', 'utf8') : '';
  return text.split('\n').some((line) => line.trim().split(/\s+/)[0] === String(GROUP));
}

async function waitFor(what: string, check: () => boolean, ms: number): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`bench: gave up waiting for ${what}`);
    await sleep(20);
  }
}

function flood(max = 100_000_000, seconds = FLOOD_SECONDS): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(
      'setpriv',
      [
        '--reuid',
        FLOOD_USER,
        '--regid',
        'nogroup',
        '--clear-groups',
        process.execPath,
        FLOOD,
        [...V4, ...V6].join(','),
        '20000',
        String(PORTS),
        String(seconds * 1000),
        String(max),
      ],
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.on('error', reject);
    child.on('exit', () => {
      try {
        resolve((JSON.parse(out.trim().split('\n').pop() ?? '') as { sent: number }).sent);
      } catch {
        reject(new Error(`bench: the flood printed ${JSON.stringify(out)}`));
      }
    });
  });
}

/**
 * A loss at the flood's very end shows only in a later packet's sequence number: once the reader is still,
 * one packet more — and again if that one was lost too (sent while the socket was still full), up to 5 times.
 * Returns the packets sent in all.
 */
async function revealEndLoss(seen: () => number | Promise<number>, flooded: number): Promise<number> {
  let sent = flooded;
  for (let tries = 0; tries < 5; tries++) {
    let last = await seen();
    for (let still = 0; still < 3 && last < sent;) {
      await sleep(200);
      const now = await seen();
      still = now === last ? still + 1 : 0;
      last = now;
    }
    if (last >= sent) break;
    sent += await flood(1, 1);
  }
  return sent;
}

async function egressdRow(state: string, withStore: boolean): Promise<Row> {
  const log = pino({ level: 'warn' }, pino.destination(2));
  const inForce = { policy: { apps: [], globalDeny: [], defaults: { log: { group: GROUP } } }, facts: {}, compiled: { ruleIds: [] } } as unknown as InForce;
  const reader = await startDenialReader(inForce, { log, stateDir: state, learnedNames: () => [] });
  const rssBefore = process.memoryUsage().rss;
  // The store as the daemon runs it: its database in a worker thread, add handed over, the queue bounded (dropped and counted past it).
  const store = withStore ? await startDenialStore(join(mkdtempSync(join(tmpdir(), 'egd-bench-store-')), 'denials.sqlite'), { log, group: null }) : undefined;
  let lastStored = 0;
  let storedSeen = 0;
  reader.subscribe((record) => {
    store?.add([record]);
  });
  let lastEvent = 0;
  let seen = 0;
  const watch = setInterval(() => {
    const c = reader.counters();
    if (c.events + c.lost !== seen) {
      seen = c.events + c.lost;
      lastEvent = performance.now();
    }
    const written = store?.counters().written ?? 0;
    if (written !== storedSeen) {
      storedSeen = written;
      lastStored = performance.now();
    }
  }, 20);
  const start = performance.now();
  const flooded = await flood();
  await waitFor(
    'the reader to drain',
    () => reader.counters().events + reader.counters().lost >= flooded || performance.now() - lastEvent > 1000,
    DRAIN_SECONDS * 1000 + 2000,
  ).catch(() => undefined);
  const drained = reader.counters();
  const readSeconds = (lastEvent - start) / 1000;
  const sent = await revealEndLoss(() => reader.counters().events + reader.counters().lost, flooded);
  const counters = reader.counters();
  // Closing the reader closes its open aggregates: their records go to the store too, so every event read is in a record.
  await reader.close();
  let storeCounts: DenialStoreCounters | undefined;
  let storedPackets: number | undefined;
  if (store) {
    await store.flush();
    clearInterval(watch);
    storeCounts = store.counters();
    storedPackets = (await store.summary({})).packets;
    await store.close();
  }
  clearInterval(watch);
  const rss = process.memoryUsage().rss;
  const final = reader.counters();
  return {
    reader: store ? 'egressd reader + store (worker)' : 'egressd reader alone',
    sent,
    read: counters.events,
    readRate: drained.events / readSeconds,
    records: final.records,
    stored: storeCounts?.written,
    storedRate: storeCounts ? storeCounts.written / ((lastStored - start) / 1000) : undefined,
    storeDropped: storeCounts ? storeCounts.dropped + storeCounts.failed : undefined,
    storeUnaccounted:
      storeCounts && storedPackets !== undefined ? final.events - storedPackets - storeCounts.droppedEvents - storeCounts.failedEvents : undefined,
    lost: counters.lost,
    unaccounted: sent - counters.events - counters.lost,
    enobufs: counters.enobufs,
    rssMb: rss / 1024 / 1024,
    rssBeforeMb: rssBefore / 1024 / 1024,
  };
}

/**
 * The reader and the store as egressd runs them (the daemon's denial parts: reader, store worker), alone in a
 * process of their own so its memory is theirs: told "counters" on stdin, it prints its counters and memory.
 * From dist/ when built (as egressd runs: plain node, no tsx in memory), else from the sources under tsx.
 */
const RSS_CHILD = `
import { readFileSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { setFlagsFromString } from 'node:v8';
const [state, group, from, pinoUrl, flags] = process.argv.slice(2);
// What src/daemon/main.ts sets at run time (the same call, after start-up), so this row measures the daemon's heap, not Node's default one.
if (flags === 'daemon') setFlagsFromString('--heap-growing-percent=50');
const { default: pino } = await import(pinoUrl);
const { startDenialReader } = await import(from + '/denials/reader.js');
const { startDenialStore } = await import(from + '/denials/store-worker.js');
const log = pino({ level: 'warn' }, pino.destination(2));
const inForce = { policy: { apps: [], defaults: { log: { group: Number(group) } } }, facts: {}, compiled: { ruleIds: [] } };
const reader = await startDenialReader(inForce, { log, stateDir: state, learnedNames: () => [] });
const store = await startDenialStore(state + '/rss-store/denials.sqlite', { log, group: null });
reader.subscribe((record) => store.add([record]));
const memory = () => {
  const status = readFileSync('/proc/self/status', 'utf8');
  const kb = (field) => Number(new RegExp(field + ':[^0-9]*([0-9]+)').exec(status)?.[1]) / 1024;
  const m = process.memoryUsage();
  return { rss: kb('VmRSS'), hwm: kb('VmHWM'), anon: kb('RssAnon'), heapUsed: m.heapUsed / 1048576, heapTotal: m.heapTotal / 1048576, external: m.external / 1048576 };
};
process.stdout.write(JSON.stringify({ ready: true }) + '\\n');
for await (const line of createInterface({ input: process.stdin })) {
  if (line === 'counters') process.stdout.write(JSON.stringify({ reader: reader.counters(), store: store.counters(), memory: memory() }) + '\\n');
  if (line === 'close') break;
}
await reader.close();
await store.close();
`;

interface RssRow {
  readonly from: string;
  readonly sent: number;
  readonly heap: string;
  readonly events: number;
  readonly lost: number;
  readonly stored: number;
  readonly dropped: number;
  readonly rssBefore: number;
  readonly rss: number;
  readonly anon: number;
  readonly hwm: number;
  readonly seconds: number;
}

/**
 * 1,000,000 packets (the flood stops by itself at that count) into a fresh reader + store process; its memory once they are read.
 * `tree`: the checkout whose dist/ (or src/) runs — this one, or another built tree to compare with (--rss-compare DIR).
 * `flags`: 'daemon' sets V8's flags as src/daemon/main.ts does at run time; 'node' leaves Node's defaults (the rows before 2026-12-05).
 */
async function rssRow(state: string, tree = ROOT, flags: 'daemon' | 'node' = 'daemon'): Promise<RssRow> {
  const built = existsSync(join(tree, 'dist/denials/store-worker.js'));
  const from = pathToFileURL(join(tree, built ? 'dist' : 'src')).href;
  // A file, not -e: a worker thread inherits the process's flags, and --input-type is refused in a worker.
  const script = join(state, 'rss-child.mjs');
  writeFileSync(script, RSS_CHILD);
  const child = spawn(
    process.execPath,
    [...(built ? [] : ['--import', 'tsx']), script, state, String(GROUP), from, pathToFileURL(createRequire(import.meta.url).resolve('pino')).href, flags],
    {
      cwd: ROOT,
      stdio: ['pipe', 'pipe', 'inherit'],
    },
  );
  const lines: string[] = [];
  let buffered = '';
  child.stdout.on('data', (d: Buffer) => {
    buffered += d.toString();
    for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
      lines.push(buffered.slice(0, at));
      buffered = buffered.slice(at + 1);
    }
  });
  type Answer = {
    reader: { events: number; lost: number };
    store: DenialStoreCounters;
    memory: { rss: number; hwm: number; anon: number; heapUsed: number; heapTotal: number; external: number };
  };
  const ask = async (): Promise<Answer> => {
    const before = lines.length;
    child.stdin.write('counters\n');
    await waitFor('the reader + store process to answer', () => lines.length > before, 10_000);
    return JSON.parse(lines[lines.length - 1]!) as Answer;
  };
  try {
    await waitFor('the reader + store process to bind', () => lines.length > 0, 20_000);
    const before = await ask();
    const started = performance.now();
    // One packet more once the flood has stopped: a loss at the flood's very end shows only in a later packet's sequence number.
    const flooded = await flood(RSS_EVENTS, RSS_MAX_SECONDS);
    const sent = await revealEndLoss(async () => {
      const { reader } = await ask();
      return reader.events + reader.lost;
    }, flooded);
    const seconds = (performance.now() - started) / 1000;
    const last = await ask();
    return {
      from: `${tree === ROOT ? 'this tree' : tree}, ${built ? 'dist' : 'src under tsx'}, ${flags === 'daemon' ? "the daemon's V8 flags" : "Node's default V8 flags"}`,
      sent,
      heap: `main thread's heap ${before.memory.heapUsed.toFixed(1)} MB used of ${before.memory.heapTotal.toFixed(1)} before, ${last.memory.heapUsed.toFixed(1)} of ${last.memory.heapTotal.toFixed(1)} after, external ${last.memory.external.toFixed(1)}`,
      events: last.reader.events,
      lost: last.reader.lost,
      stored: last.store.written,
      dropped: last.store.dropped + last.store.failed,
      rssBefore: before.memory.rss,
      rss: last.memory.rss,
      anon: last.memory.anon,
      hwm: last.memory.hwm,
      seconds,
    };
  } finally {
    child.stdin.end('close\n');
    await new Promise((resolve) => child.once('exit', resolve));
  }
}

const ULOGD_TABLE = `CREATE TABLE ulog_pkt (oob_time_sec INT UNSIGNED, oob_prefix VARCHAR(64), oob_uid INT UNSIGNED, oob_gid INT UNSIGNED, oob_family TINYINT UNSIGNED, ip_protocol TINYINT UNSIGNED, ip_daddr_str VARCHAR(40), udp_dport SMALLINT UNSIGNED, tcp_dport SMALLINT UNSIGNED);`;

function sqliteCount(db: string): number {
  const result = spawnSync('sqlite3', [db, 'SELECT count(*) FROM ulog_pkt;'], { encoding: 'utf8' });
  return Number(result.stdout.trim()) || 0;
}

async function ulogdRow(dir: string, wal: boolean): Promise<Row> {
  const db = join(dir, wal ? 'ulogd-wal.sqlite3' : 'ulogd.sqlite3');
  execFileSync('sqlite3', [db, `${wal ? 'PRAGMA journal_mode=WAL;' : ''}${ULOGD_TABLE}`]);
  const conf = join(dir, wal ? 'ulogd-wal.conf' : 'ulogd.conf');
  const plugins = '/usr/lib/x86_64-linux-gnu/ulogd';
  writeFileSync(
    conf,
    [
      '[global]',
      `logfile="${join(dir, 'ulogd.log')}"`,
      'loglevel=5',
      ...['inppkt_NFLOG', 'raw2packet_BASE', 'filter_IP2STR', 'output_SQLITE3'].map((p) => `plugin="${plugins}/ulogd_${p}.so"`),
      'stack=log1:NFLOG,base1:BASE,ip2str1:IP2STR,sqlite3_pkt:SQLITE3',
      '[log1]',
      `group=${GROUP}`,
      '[sqlite3_pkt]',
      'table="ulog_pkt"',
      `db="${db}"`,
      '',
    ].join('\n'),
  );
  const ulogd = spawn('ulogd', ['-c', conf], { stdio: 'ignore' });
  try {
    await waitFor('ulogd to bind the group', groupBound, 10_000);
    const start = performance.now();
    const sent = await flood();
    let count = sqliteCount(db);
    let lastChange = performance.now();
    const deadline = performance.now() + DRAIN_SECONDS * 1000;
    while (performance.now() < deadline && performance.now() - lastChange < 1500) {
      await sleep(250);
      const now = sqliteCount(db);
      if (now !== count) {
        count = now;
        lastChange = performance.now();
      }
    }
    const rss = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${ulogd.pid}/status`, 'utf8'))?.[1] ?? 0) / 1024;
    return {
      reader: `ulogd2 → SQLite (${wal ? 'WAL' : 'default journal'})`,
      sent,
      read: count,
      readRate: count / ((lastChange - start) / 1000),
      records: undefined,
      stored: count,
      storedRate: count / ((lastChange - start) / 1000),
      lost: sent - count,
      unaccounted: undefined,
      enobufs: undefined,
      rssMb: rss,
      rssBeforeMb: undefined,
    };
  } finally {
    ulogd.kill('SIGTERM');
    await new Promise((resolve) => ulogd.once('exit', resolve));
    await waitFor('ulogd to let the group go', () => !groupBound(), 5000).catch(() => undefined);
  }
}

async function inner(root: string): Promise<void> {
  const ip = (...args: string[]) => execFileSync('ip', args);
  ip('link', 'set', 'lo', 'up');
  // A veth pair (no dummy module here): the flood is dropped in the output hook, before it would leave.
  ip('link', 'add', 'd0', 'type', 'veth', 'peer', 'name', 'd1');
  ip('link', 'set', 'd0', 'up');
  ip('link', 'set', 'd1', 'up');
  ip('addr', 'add', '192.0.2.1/24', 'dev', 'd0');
  ip('-6', 'addr', 'add', '2001:db8::1/64', 'dev', 'd0', 'nodad');
  ip('route', 'add', '203.0.113.0/24', 'dev', 'd0');
  ip('-6', 'route', 'add', '2001:db8:1::/64', 'dev', 'd0');
  const policy = join(root, 'policy');
  const state = join(root, 'state');
  execFileSync('mkdir', ['-p', policy, state]);
  writeFileSync(
    join(policy, '00.yaml'),
    `defaults: {egress: allow, log: {denials: true, group: ${GROUP}, rate: 999999/second, burst: 10000}}\napps:\n  flooder:\n    identity: {user: ${FLOOD_USER}}\n    default: deny\n`,
  );
  execFileSync(process.execPath, ['--import', 'tsx', CLI, 'apply', policy], {
    env: { ...process.env, EGRESSD_STATE_DIR: state },
    stdio: ['ignore', 'ignore', 'inherit'],
  });

  const load = [loadavg()];
  const rows: Row[] = [];
  if (!values['rss-only']) {
    rows.push(await egressdRow(state, false));
    rows.push(await egressdRow(state, true));
    rows.push(await ulogdRow(root, false));
    rows.push(await ulogdRow(root, true));
  }
  // Side by side in one run: another built tree (e.g. the commit before a change) with Node's flags and the daemon's, then this one.
  const rssRows: RssRow[] = [];
  for (const tree of values['rss-compare']) {
    rssRows.push(await rssRow(state, tree, 'node'));
    rssRows.push(await rssRow(state, tree, 'daemon'));
  }
  rssRows.push(await rssRow(state));
  load.push(loadavg());

  const n = (value: number | undefined, digits = 0) =>
    value === undefined || !Number.isFinite(value) ? '—' : value.toLocaleString('en-US', { maximumFractionDigits: digits });
  console.log(
    `\nbench/denials.ts${quick ? ' --quick' : ''}: UDP flood from one denied uid, ${FLOOD_SECONDS} s per row, ${V4.length + V6.length} addresses × ${PORTS} ports`,
  );
  console.log(
    `load average (1, 5, 15 min): ${load.map((l) => l.map((x) => x.toFixed(2)).join(', ')).join(' at the start; ')} at the end (2 cores; other runs skew the numbers)`,
  );
  console.log(
    '| reader | sent = logged | read | read/s | lost (counted) | unaccounted | records | stored | stored/s | store dropped (counted) | store unaccounted | ENOBUFS | RSS MB (before) |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    console.log(
      `| ${r.reader} | ${n(r.sent)} | ${n(r.read)} | ${n(r.readRate)} | ${n(r.lost)} | ${n(r.unaccounted)} | ${n(r.records)} | ${n(r.stored)} | ${n(r.storedRate)} | ${n(r.storeDropped)} | ${n(r.storeUnaccounted)} | ${n(r.enobufs)} | ${n(r.rssMb, 1)}${r.rssBeforeMb === undefined ? '' : ` (${n(r.rssBeforeMb, 1)})`} |`,
    );
  }
  for (const rss of rssRows)
    console.log(
      `\nreader + store in a process of their own (${rss.from}), ${n(RSS_EVENTS)} packets (the flood stops at that count; ${n(rss.seconds, 1)} s): sent ${n(rss.sent)}, read ${n(rss.events)}, lost ${n(rss.lost)} (counted), unaccounted ${n(rss.sent - rss.events - rss.lost)}, stored ${n(rss.stored)}, store dropped ${n(rss.dropped)} (counted); ${rss.heap}`,
    );
  console.log('\n| process | events | VmRSS MB before | VmRSS MB after | of it anonymous | VmHWM MB |');
  console.log('|---|---|---|---|---|---|');
  for (const rss of rssRows)
    console.log(`| ${rss.from} | ${n(rss.events + rss.lost)} | ${n(rss.rssBefore, 1)} | ${n(rss.rss, 1)} | ${n(rss.anon, 1)} | ${n(rss.hwm, 1)} |`);
}

if (values.inner !== undefined) {
  await inner(values.inner);
} else {
  if (process.getuid?.() !== 0) {
    console.error('bench/denials.ts: run as root (it builds a network namespace)');
    process.exit(2);
  }
  const root = mkdtempSync(join(tmpdir(), 'egd-bench-denials-'));
  process.exit(
    runInOwnNamespace(
      'egdbench-denials',
      fileURLToPath(import.meta.url),
      root,
      [
        '--inner',
        root,
        ...(quick ? ['--quick'] : []),
        ...(values['rss-only'] ? ['--rss-only'] : []),
        ...values['rss-compare'].flatMap((dir) => ['--rss-compare', dir]),
      ],
      {
        timeoutMs: (quick ? 240_000 : 600_000) + values['rss-compare'].length * 2 * 150_000,
      },
    ),
  );
}
