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
 *     (1) egressd's reader (src/denials/reader.ts) in this process: events
 *         read per second, records made, events lost (sequence gaps) and
 *         ENOBUFS, and RSS after the run; when src/denials/store.ts exists
 *         (the store, merged later), records also go into a store in a
 *         temporary directory, and its stored rate fills the "stored/s"
 *         column;
 *     (2) ulogd2 (Debian's) with its SQLITE3 output into a table of the
 *         fields a denial record holds, with SQLite's default journal;
 *     (3) the same with the database in WAL mode.
 *   For ulogd2, stored/s is rows stored over the time from the flood's start
 *   to the last row, and lost is packets logged minus rows stored (worked
 *   out here: ulogd2 does not count it). For egressd, lost is what its
 *   sequence numbers counted, and "unaccounted" what neither it read nor
 *   counted (a loss at the very end shows only in a later packet's number).
 *
 *   npx tsx bench/denials.ts [--quick]   (as root; `npm run bench -- denials`)
 * --quick floods 2 s per row (under a minute in all); the full run 10 s.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import pino from 'pino';
import type { DenialRecord } from '../src/denials/record.js';
import type { InForce } from '../src/resolver/runtime.js';
import { startDenialReader } from '../src/denials/reader.js';
import { runInOwnNamespace } from './lib/netns.js';

const { values } = parseArgs({ options: { inner: { type: 'string' }, quick: { type: 'boolean', default: false } } });
const quick = values.quick;
const ROOT = join(import.meta.dirname, '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const FLOOD = join(ROOT, 'test/denials/flood.cjs');
const STORE = join(ROOT, 'src/denials/store.ts');
const GROUP = 7799;
const FLOOD_SECONDS = quick ? 2 : 10;
/** How long a reader may take to drain what the flood left queued, at most. */
const DRAIN_SECONDS = quick ? 3 : 10;
const V4 = Array.from({ length: 8 }, (_, i) => `203.0.113.${10 + i}`);
const V6 = Array.from({ length: 8 }, (_, i) => `2001:db8:1::${(10 + i).toString(16)}`);
const PORTS = 4096;
const FLOOD_USER = 'nobody';

interface Row {
  readonly reader: string;
  readonly sent: number;
  readonly read: number;
  readonly readRate: number;
  readonly records: number | undefined;
  readonly stored: number | undefined;
  readonly storedRate: number | undefined;
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

function flood(): Promise<number> {
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
        String(FLOOD_SECONDS * 1000),
        '100000000',
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

async function egressdRow(state: string): Promise<Row> {
  const log = pino({ level: 'warn' }, pino.destination(2));
  const inForce = { policy: { defaults: { log: { group: GROUP } } }, compiled: { ruleIds: [] } } as unknown as InForce;
  const reader = await startDenialReader(inForce, { log, stateDir: state, learnedNames: () => [] });
  const rssBefore = process.memoryUsage().rss;
  // The store, once merged: its own rate beside the reader's.
  let store: { add(records: readonly DenialRecord[]): void; flush(): void; close(): void } | undefined;
  let stored = 0;
  if (existsSync(STORE)) {
    const module = (await import(pathToFileURL(STORE).href)) as { openDenialStore(path: string): NonNullable<typeof store> };
    store = module.openDenialStore(join(mkdtempSync(join(tmpdir(), 'egd-bench-store-')), 'denials.sqlite'));
  }
  let lastRecord = 0;
  reader.subscribe((record) => {
    lastRecord = performance.now();
    store?.add([record]);
    stored++;
  });
  let lastEvent = 0;
  let seen = 0;
  const watch = setInterval(() => {
    const c = reader.counters();
    if (c.events + c.lost !== seen) {
      seen = c.events + c.lost;
      lastEvent = performance.now();
    }
  }, 20);
  const start = performance.now();
  const sent = await flood();
  await waitFor(
    'the reader to drain',
    () => reader.counters().events + reader.counters().lost >= sent || performance.now() - lastEvent > 1000,
    DRAIN_SECONDS * 1000 + 2000,
  ).catch(() => undefined);
  clearInterval(watch);
  const counters = reader.counters();
  const readSeconds = (lastEvent - start) / 1000;
  if (store) {
    store.flush();
    store.close();
  }
  const rss = process.memoryUsage().rss;
  await reader.close();
  return {
    reader: store ? 'egressd reader + store' : 'egressd reader',
    sent,
    read: counters.events,
    readRate: counters.events / readSeconds,
    records: counters.records,
    stored: store ? stored : undefined,
    storedRate: store ? stored / ((lastRecord - start) / 1000) : undefined,
    lost: counters.lost,
    unaccounted: sent - counters.events - counters.lost,
    enobufs: counters.enobufs,
    rssMb: rss / 1024 / 1024,
    rssBeforeMb: rssBefore / 1024 / 1024,
  };
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

  const rows: Row[] = [];
  rows.push(await egressdRow(state));
  rows.push(await ulogdRow(root, false));
  rows.push(await ulogdRow(root, true));

  const n = (value: number | undefined, digits = 0) =>
    value === undefined || !Number.isFinite(value) ? '—' : value.toLocaleString('en-US', { maximumFractionDigits: digits });
  console.log(
    `\nbench/denials.ts${quick ? ' --quick' : ''}: UDP flood from one denied uid, ${FLOOD_SECONDS} s per row, ${V4.length + V6.length} addresses × ${PORTS} ports`,
  );
  console.log('| reader | sent = logged | read | read/s | records | stored | stored/s | lost | unaccounted | ENOBUFS | RSS MB (before) |');
  console.log('|---|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) {
    console.log(
      `| ${r.reader} | ${n(r.sent)} | ${n(r.read)} | ${n(r.readRate)} | ${n(r.records)} | ${n(r.stored)} | ${n(r.storedRate)} | ${n(r.lost)} | ${n(r.unaccounted)} | ${n(r.enobufs)} | ${n(r.rssMb, 1)}${r.rssBeforeMb === undefined ? '' : ` (${n(r.rssBeforeMb, 1)})`} |`,
    );
  }
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
    runInOwnNamespace('egdbench-denials', fileURLToPath(import.meta.url), root, ['--inner', root, ...(quick ? ['--quick'] : [])], {
      timeoutMs: quick ? 60_000 : 300_000,
    }),
  );
}
