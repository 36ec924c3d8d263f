/**
 * The denial store's cost (issue 20), on real SQLite files in a temporary
 * directory:
 *   (1) records/s stored through `add` (batched: one transaction per 1,000),
 *       beside one transaction per record (what a store that commits every
 *       event does: ulogd2's SQLite output, for one);
 *   (2) open (with its quick_check), `summary` and `query` over 1,000,000
 *       records — the issue's target: `denials --summary` ≤ 200 ms — for
 *       the whole store (the per-hour rollup), a period cut mid-hour, and a
 *       filter that must read rows (an app); and `egressctl denials
 *       --summary` as a fresh process;
 *   (3) housekeeping: pruning 10 % of the records by age.
 * The records vary as a busy machine's would: 40 apps, 5,000 destinations
 * (a quarter IPv6), 200 rules, one record a second back from now.
 *
 *   npx tsx bench/denials-store.ts [--quick]    (--quick: under a minute)
 * bench/denials.ts (the reader's benchmark) calls `benchDenialStore` and
 * prints its rows beside its own.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pathToFileURL } from 'node:url';
import Database from 'better-sqlite3';
import type { DenialRecord } from '../src/denials/record.js';
import { COLUMNS, denialStorePath, openDenialStore, rebuildRollup, recordValues } from '../src/denials/store.js';
import { median } from './lib/stats.js';

export interface StoreBenchRow {
  readonly scenario: string;
  readonly value: string;
  readonly note: string;
}

const ROOT = join(import.meta.dirname, '..');
/** The bench's stores hold all their records (the default cap, 256 MiB, holds ≈ 750,000). */
const BIG = 4 * 1024 * 1024 * 1024;

function* records(n: number, end: number): Generator<DenialRecord> {
  for (let i = 0; i < n; i++) {
    const d = (i * 7919) % 5000;
    const v6 = d % 4 === 0;
    const rule = (i * 31) % 200;
    const lastSeen = end - (n - 1 - i) * 1000;
    yield {
      firstSeen: lastSeen - 1500,
      lastSeen,
      count: 1 + (i % 5),
      shortId: `r${rule.toString(16).padStart(8, '0')}`,
      ruleId: `app/app${i % 40}/${rule}`,
      kind: 'app-rule',
      file: '20-apps.yaml',
      line: 1 + rule,
      app: `app${i % 40}`,
      domain: undefined,
      uid: 1000 + (i % 7),
      gid: 1000,
      protocol: i % 3 === 0 ? 'udp' : 'tcp',
      family: v6 ? 6 : 4,
      address: v6 ? `2001:db8:${(d >> 8).toString(16)}::${(d & 255).toString(16)}` : `198.51.${(d >> 8) & 255}.${d & 255}`,
      port: 443,
      name: d % 3 === 0 ? undefined : `host${d}.tracker${d % 50}.example`,
      nameAskedBy: d % 3 === 0 ? undefined : 'sender',
    };
  }
}

const ms = (t0: number) => performance.now() - t0;
const f = (x: number, digits = 1) => x.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits });

function timed(times: number, body: () => unknown): number {
  const runs: number[] = [];
  for (let i = 0; i < times; i++) {
    const t0 = performance.now();
    body();
    runs.push(ms(t0));
  }
  return median(runs);
}

/**
 * Writes n records as the store would hold them, fast: rows first with the
 * indexes and triggers dropped, then the indexes built and the rollup filled
 * in one pass each — the same database `add` makes, in a fraction of the
 * time (--quick builds its 1,000,000-record store this way).
 */
function bulkLoad(path: string, n: number, end: number): void {
  openDenialStore(path, { group: null, maxBytes: BIG }).close();
  const db = new Database(path);
  const schema = db.prepare("SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND sql IS NOT NULL").all() as {
    type: string;
    name: string;
    sql: string;
  }[];
  for (const o of schema) db.exec(`DROP ${o.type.toUpperCase()} ${o.name}`);
  const insert = db.prepare(`INSERT INTO denials (${COLUMNS.join(', ')}) VALUES (${COLUMNS.map(() => '?').join(', ')})`);
  db.transaction(() => {
    for (const r of records(n, end)) insert.run(recordValues(r));
  })();
  for (const o of schema) db.exec(o.sql);
  rebuildRollup(db);
  db.close();
}

export async function benchDenialStore(options: { quick: boolean; records?: number }): Promise<StoreBenchRow[]> {
  const n = options.records ?? 1_000_000;
  const scratch = mkdtempSync(join(tmpdir(), 'egd-bench-store-'));
  const rows: StoreBenchRow[] = [];
  try {
    const now = Date.now();
    const path = denialStorePath(join(scratch, 'state'));
    // (1) batched writes, as the reader hands records over: all of the big store in a full run, 50,000 with --quick (which bulk-loads the rest).
    const added = options.quick ? 50_000 : n;
    let store = openDenialStore(options.quick ? denialStorePath(join(scratch, 'added')) : path, { group: null, maxBytes: BIG });
    let t0 = performance.now();
    const cpu0 = process.cpuUsage();
    let chunk: DenialRecord[] = [];
    for (const r of records(added, now)) {
      chunk.push(r);
      if (chunk.length === 100) {
        store.add(chunk);
        chunk = [];
      }
    }
    store.add(chunk);
    store.flush();
    const batched = ms(t0);
    const cpu = process.cpuUsage(cpu0);
    const cpuMs = (cpu.user + cpu.system) / 1000;
    rows.push({
      scenario: 'store: add, batched (1,000 per transaction)',
      value: `${f(added / (batched / 1000), 0)} records/s`,
      note: `${f(added, 0)} records in ${f(batched / 1000)} s; ${f(added / (cpuMs / 1000), 0)} records per CPU-second`,
    });
    store.close();
    if (options.quick) {
      t0 = performance.now();
      bulkLoad(path, n, now);
      rows.push({
        scenario: `bulk load of ${f(n, 0)} records (bench set-up, --quick)`,
        value: `${f(ms(t0) / 1000)} s`,
        note: 'rows, then indexes, then rollup',
      });
    }
    const bytes = statSync(path).size;

    const single = options.quick ? 2_000 : 10_000;
    const onePath = denialStorePath(join(scratch, 'one'));
    openDenialStore(onePath, { group: null }).close();
    const db = new Database(onePath);
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = FULL');
    const insert = db.prepare(
      'INSERT INTO denials (first_seen, last_seen, count, short_id, rule_id, kind, file, line, app, domain, uid, gid, protocol, family, address, port, name, addr, name_rev) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
    );
    t0 = performance.now();
    for (const r of records(single, now))
      insert.run(
        r.firstSeen,
        r.lastSeen,
        r.count,
        r.shortId,
        r.ruleId,
        r.kind,
        r.file,
        r.line,
        r.app,
        null,
        r.uid,
        r.gid,
        r.protocol,
        r.family,
        r.address,
        r.port,
        r.name ?? null,
        Buffer.alloc(4),
        null,
      );
    const perRecord = ms(t0);
    db.close();
    rows.push({
      scenario: 'reference: one transaction per record (WAL, synchronous=FULL)',
      value: `${f(single / (perRecord / 1000), 0)} records/s`,
      note: `${f(single, 0)} records`,
    });

    // (2) reads over the big store.
    t0 = performance.now();
    store = openDenialStore(path, { group: null, maxBytes: BIG });
    const openMs = ms(t0);
    rows.push({
      scenario: `open ${f(n, 0)} records (size check, housekeeping)`,
      value: `${f(openMs)} ms`,
      note: `${f(bytes / 1024 / 1024)} MiB, ${f(bytes / n, 0)} bytes a record`,
    });
    const reps = options.quick ? 3 : 7;
    // Warm the page cache as a running daemon's is.
    store.summary({});
    const all = store.summary({});
    rows.push({
      scenario: `summary, whole store (${f(n, 0)} records)`,
      value: `${f(timed(reps, () => store.summary({})))} ms`,
      note: `target ≤ 200 ms; ${f(all.records, 0)} records, ${f(all.packets, 0)} packets`,
    });
    const since = now - 6 * 3_600_000 - 1_234_567;
    rows.push({
      scenario: 'summary --since (cut mid-hour)',
      value: `${f(timed(reps, () => store.summary({ since })))} ms`,
      note: `${f(store.summary({ since }).records, 0)} records`,
    });
    rows.push({
      scenario: 'summary --app (reads its rows)',
      value: `${f(timed(reps, () => store.summary({ app: 'app7' })))} ms`,
      note: `${f(store.summary({ app: 'app7' }).records, 0)} records`,
    });
    rows.push({ scenario: 'query, newest 1,000', value: `${f(timed(reps, () => store.query({})))} ms`, note: '' });
    rows.push({ scenario: 'query --dest 2001:db8::/32, newest 1,000', value: `${f(timed(reps, () => store.query({ dest: '2001:db8::/32' })))} ms`, note: '' });
    rows.push({ scenario: 'query --dest *.tracker7.example', value: `${f(timed(reps, () => store.query({ dest: '*.tracker7.example' })))} ms`, note: '' });
    store.close();

    const cli = existsSync(join(ROOT, 'dist/cli/main.js')) ? ['dist/cli/main.js'] : ['--import', 'tsx', 'src/cli/main.ts'];
    const fresh = timed(reps, () => {
      const run = spawnSync(process.execPath, [...cli, 'denials', '--summary'], {
        cwd: ROOT,
        env: { ...process.env, EGRESSD_STATE_DIR: join(scratch, 'state') },
        encoding: 'utf8',
      });
      if (run.status !== 0) throw new Error(`egressctl denials --summary: ${run.stderr}`);
    });
    rows.push({
      scenario: `egressctl denials --summary, fresh process (${cli[0] === 'dist/cli/main.js' ? 'dist' : 'tsx'})`,
      value: `${f(fresh)} ms`,
      note: 'node start-up included; egressd stopped, so read into memory',
    });

    // (3) housekeeping: the oldest 10 % are past the retention.
    const retentionDays = ((n * 0.9) / 86_400) * 1.0;
    // Housekeeping gives the loop back between slices: the longest the loop waited on it is what the resolver would have.
    let longest = 0;
    let last = performance.now();
    let watching = true;
    const watch = () => {
      const at = performance.now();
      longest = Math.max(longest, at - last);
      last = at;
      if (watching) setTimeout(watch, 1);
    };
    setTimeout(watch, 1);
    await new Promise((resolve) => setTimeout(resolve, 10));
    t0 = performance.now();
    last = t0;
    const pruneStore = openDenialStore(path, { group: null, retentionDays, maxBytes: BIG });
    await pruneStore.idle();
    const pruneMs = ms(t0) - openMs;
    await new Promise((resolve) => setTimeout(resolve, 5));
    watching = false;
    const left = pruneStore.summary({}).records;
    pruneStore.close();
    rows.push({ scenario: 'prune by age, 10 % of the records', value: `${f(Math.max(0, pruneMs))} ms`, note: `${f(n - left, 0)} removed` });
    rows.push({
      scenario: 'prune by age: longest event-loop stall',
      value: `${f(longest)} ms`,
      note: 'open included; slices of ~5 ms, the loop given back between them',
    });
    return rows;
  } finally {
    rmSync(scratch, { recursive: true, force: true });
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const quick = process.argv.includes('--quick');
  const rows = await benchDenialStore({ quick });
  const w = [Math.max(...rows.map((r) => r.scenario.length)), Math.max(...rows.map((r) => r.value.length))];
  console.log(`| ${'scenario'.padEnd(w[0]!)} | ${'result'.padEnd(w[1]!)} | note |`);
  console.log(`|${'-'.repeat(w[0]! + 2)}|${'-'.repeat(w[1]! + 2)}|------|`);
  for (const r of rows) console.log(`| ${r.scenario.padEnd(w[0]!)} | ${r.value.padEnd(w[1]!)} | ${r.note} |`);
}
