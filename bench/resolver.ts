/**
 * The resolver's cost, side by side in one run (issue 18), on loopback in a
 * network namespace of its own (the bench creates and removes it; nothing
 * touches the machine's own network or ruleset):
 *   (1) an authoritative dnsmasq answering directly: the ceiling;
 *   (2) Debian's dnsmasq forwarding to it with an `nftset=` line for every
 *       name of the 143,876-name list (policies/lists/tracking.txt), into
 *       timeout sets of the kind egressd compiles (`typeof ip daddr`,
 *       `flags timeout`) in a table of the bench's own;
 *   (3) egressd's resolver doing the same job, started alone
 *       (`node dist/daemon/main.js resolver --policy DIR`) over a policy that
 *       loads the same list as a global deny, with `deniedAnswer: true` so
 *       that both return the true answers, applied first with
 *       `node dist/cli/main.js apply DIR` (state in a temporary directory).
 * (2) and (3) run twice: with every answer from upstream (the authoritative
 * server answers with TTL 0, so no resolver may cache it; dnsmasq also runs
 * with --cache-size=0, as in the issue's measurement) and from a warm cache
 * (TTL 3600, every name asked once before the load). What share of the
 * answers really came from upstream is read off the authoritative server's
 * own counters (SIGUSR1) and printed beside each row. Two reference rows:
 * dnsmasq forwarding without nftset= (what forwarding alone costs), and with
 * nftset= lines for the 10,000 queried names only (dnsmasq's throughput
 * falls with the number of nftset= entries, so with the whole list most of
 * its cost is the list's length, not the set update).
 *
 * Load: dnsperf (Debian's), 10,000 names of the list (so every answer goes
 * into sets), 4 clients, a fixed duration per row: at full load (dnsperf's
 * default 100 queries outstanding) for queries per second, and rate-limited
 * (-Q) for latency. p50/p99 come from dnsperf's per-query output (-v) of the
 * rate-limited rows; the full-load rows run without -v (printing every
 * response would slow the load generator itself) and show dnsperf's average.
 *
 * Then one answer's set update, with and without a 100,000-CIDR interval set
 * in the table: egressd's writer (src/nft/set-elements.ts, imported when it
 * exists), `nft add element` as a fresh process, and dnsmasq's nftset path
 * (a fresh query through dnsmasq with the nftset lines minus the same query
 * through dnsmasq without them: the difference of the two p50s and of the
 * two p99s, queries alternating between the two).
 *
 *   npx tsx bench/resolver.ts [--quick] [--egressd-warm]   (as root; `npm run bench -- resolver`)
 * Full run ≈ 4–5 minutes, --quick ≈ 2; either is stopped at its time limit.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import dnsPacket from 'dns-packet';
import { parseNameList } from '../src/policy/lists.js';
import { dnsmasqOnly } from '../test/support/dnsmasq.js';
import { runInOwnNamespace } from './lib/netns.js';
import { percentile } from './lib/stats.js';

const { values } = parseArgs({
  options: { inner: { type: 'string' }, quick: { type: 'boolean', default: false }, 'egressd-warm': { type: 'boolean', default: false } },
});
const quick = values.quick;
/** Only egressd's warm-cache rows, nothing to compare with: for working on that path (~20 s). */
const egressdWarmOnly = values['egressd-warm'];
const ROOT = join(import.meta.dirname, '..');
const LIST = join(ROOT, 'policies/lists/tracking.txt');
const DAEMON = join(ROOT, 'dist/daemon/main.js');
const CLI = join(ROOT, 'dist/cli/main.js');
const WRITER = join(ROOT, 'src/nft/set-elements.ts');

/** The bench's own table, beside egressd's. */
const TABLE = 'egdbench';
/** Authoritative servers: TTL 0 (nothing may be cached) and TTL 3600 (for warm caches). */
const AUTH_FRESH = '127.0.0.2';
const AUTH_CACHED = '127.0.0.3';
const DNSMASQ_PLAIN = '127.0.0.10';
const DNSMASQ_NFTSET = '127.0.0.11';
const DNSMASQ_NFTSET_CACHE = '127.0.0.12';
const DNSMASQ_NFTSET_FEW = '127.0.0.13';
const EGRESSD = '127.0.0.153';
const CLIENTS = 4;
const QUERY_NAMES = 10_000;
const CIDRS = 100_000;
const MODERATE_QPS = 2000;
const FULL_SECONDS = quick ? 3 : 10;
const MODERATE_SECONDS = quick ? 2 : 5;
/** Set updates: at most this many samples, and at most this many seconds per row. */
const UPDATE_LIMITS = {
  writer: quick ? { n: 300, seconds: 3 } : { n: 1000, seconds: 8 },
  nft: quick ? { n: 15, seconds: 5 } : { n: 50, seconds: 15 },
  dnsmasq: quick ? { n: 100, seconds: 5 } : { n: 300, seconds: 15 },
};
/** The whole inner run; the outer run kills it a little after. */
const BUDGET_MS = (quick ? 170 : 540) * 1000;
const started = performance.now();

const TARGETS = { upstream: 2, warm: 0.8, addedP50Ms: 0.3, updateP50Ms: 0.3, rssMb: 80, loadMs: 300 };

function checkBudget(step: string): void {
  if (performance.now() - started > BUDGET_MS) throw new Error(`time limit of ${BUDGET_MS / 1000} s reached before ${step}`);
}

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

// ---------------------------------------------------------------- processes

const children = new Set<ChildProcess>();

/** Starts a server and remembers it, so that every exit path stops it. */
function startProcess(file: string, args: readonly string[], env?: NodeJS.ProcessEnv): { child: ChildProcess; output: () => string } {
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
  children.add(child);
  child.once('exit', () => children.delete(child));
  let output = '';
  const keep = (chunk: Buffer) => {
    // Logs are kept whole up to 4 MB: enough for start-up lines, bounded under a chatty server.
    if (output.length < 4 << 20) output += chunk.toString();
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  return { child, output: () => output };
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  child.kill('SIGTERM');
  const killed = await Promise.race([exited.then(() => true), sleep(3000).then(() => false)]);
  if (!killed) {
    child.kill('SIGKILL');
    await exited;
  }
}

function stopAll(): void {
  for (const child of children) child.kill('SIGKILL');
}

/** Peak and current resident memory in MB, from /proc/PID/status. */
function memory(pid: number | undefined): { hwm: number; rss: number } | undefined {
  if (pid === undefined) return undefined;
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? Number.NaN);
    return { hwm: kb('VmHWM') / 1024, rss: kb('VmRSS') / 1024 };
  } catch {
    return undefined;
  }
}

/** User and system CPU seconds a process has used, from /proc/PID/stat (clock ticks of 10 ms). */
function cpuSeconds(pid: number | undefined): { user: number; system: number } | undefined {
  if (pid === undefined) return undefined;
  try {
    // The command name in parentheses may hold spaces: the fields are counted after its closing parenthesis.
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.split(' ');
    return { user: Number(fields[11]) / 100, system: Number(fields[12]) / 100 };
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------- a small DNS client

interface Reply {
  readonly ms: number;
  readonly rcode: number;
}

/** One UDP socket; queries matched to replies by id. Used for start-up probes and one-at-a-time latencies. */
class DnsClient {
  private readonly socket = createSocket('udp4');
  private readonly pending = new Map<number, (reply: Buffer) => void>();
  private nextId = 1;

  constructor() {
    this.socket.on('message', (message) => {
      if (message.length < 4) return;
      this.pending.get(message.readUInt16BE(0))?.(message);
    });
  }

  /** The reply's latency and RCODE, or undefined after `timeoutMs`. */
  query(server: string, name: string, timeoutMs: number): Promise<Reply | undefined> {
    const id = this.nextId;
    this.nextId = (this.nextId % 0xffff) + 1;
    const message = dnsPacket.encode({ type: 'query', id, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: 'A', name }] });
    return new Promise((resolve) => {
      const start = performance.now();
      const timer = setTimeout(() => {
        this.pending.delete(id);
        resolve(undefined);
      }, timeoutMs);
      this.pending.set(id, (reply) => {
        clearTimeout(timer);
        this.pending.delete(id);
        resolve({ ms: performance.now() - start, rcode: reply.readUInt8(3) & 0x0f });
      });
      this.socket.send(message, 53, server);
    });
  }

  close(): void {
    this.socket.close();
  }
}

/** Milliseconds from `since` until `server` answers a query, probing every 20 ms; undefined when `alive` turns false or after `limitMs`. */
async function firstAnswer(client: DnsClient, server: string, name: string, since: number, alive: () => boolean, limitMs: number): Promise<number | undefined> {
  while (performance.now() - since < limitMs && alive()) {
    const reply = await client.query(server, name, 20);
    if (reply) return performance.now() - since;
  }
  return undefined;
}

// ---------------------------------------------------------------- dnsmasq

interface Dnsmasq {
  readonly name: string;
  readonly child: ChildProcess;
  readonly address: string;
  readonly startMs: number | undefined;
  /** The "answered locally" counter, read through SIGUSR1 and the log file. */
  answered(): Promise<number>;
}

async function startDnsmasq(client: DnsClient, dir: string, name: string, address: string, args: readonly string[], probe: string): Promise<Dnsmasq> {
  const log = join(dir, `${name}.log`);
  writeFileSync(log, '');
  const since = performance.now();
  const { child, output } = startProcess('dnsmasq', [...dnsmasqOnly(address), '--user=root', '--group=root', `--log-facility=${log}`, ...args]);
  const startMs = await firstAnswer(client, address, probe, since, () => child.exitCode === null, 30_000);
  if (startMs === undefined) throw new Error(`dnsmasq ${name} did not answer within 30 s:\n${output()}\n${readFileSync(log, 'utf8')}`);
  return {
    name,
    child,
    address,
    startMs,
    async answered() {
      const read = () => [...readFileSync(log, 'utf8').matchAll(/queries answered locally (\d+)/g)].map((m) => Number(m[1]));
      const before = read().length;
      child.kill('SIGUSR1');
      for (let i = 0; i < 100; i++) {
        const counts = read();
        if (counts.length > before) return counts.at(-1)!;
        await sleep(20);
      }
      throw new Error(`dnsmasq ${name} printed no statistics after SIGUSR1`);
    },
  };
}

// ---------------------------------------------------------------- dnsperf

interface Load {
  readonly qps: number;
  readonly sent: number;
  readonly completed: number;
  readonly lost: number;
  readonly avgMs: number;
  /** Share of responses other than NOERROR. */
  readonly notNoerror: number;
  /** Per-query latencies in ms, sorted (rate-limited rows only). */
  readonly latencies: readonly number[] | undefined;
}

function dnsperf(server: string, queries: string, options: { seconds?: number; runs?: number; rate?: number }): Load {
  const args = ['-s', server, '-p', '53', '-d', queries, '-c', String(CLIENTS), '-t', '2'];
  if (options.seconds) args.push('-l', String(options.seconds));
  if (options.runs) args.push('-n', String(options.runs));
  if (options.rate) args.push('-Q', String(options.rate), '-v');
  const result = spawnSync('dnsperf', args, { maxBuffer: 256 << 20, timeout: ((options.seconds ?? 60) + 30) * 1000 });
  const out = result.stdout.toString();
  if (result.status !== 0)
    throw new Error(`dnsperf ${args.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr.toString()}${out.slice(-2000)}`);
  const number = (re: RegExp) => {
    const found = re.exec(out);
    if (!found) throw new Error(`dnsperf printed no ${re.source}:\n${out.slice(-2000)}`);
    return Number(found[1]);
  };
  const completed = number(/Queries completed:\s+(\d+)/);
  const noerror = /Response codes:.*?NOERROR (\d+)/.exec(out);
  let latencies: number[] | undefined;
  if (options.rate) {
    latencies = [];
    for (const m of out.matchAll(/^> [A-Z]+ \S+ \S+ ([\d.]+)$/gm)) latencies.push(Number(m[1]) * 1000);
    latencies.sort((a, b) => a - b);
  }
  return {
    qps: number(/Queries per second:\s+([\d.]+)/),
    sent: number(/Queries sent:\s+(\d+)/),
    completed,
    lost: number(/Queries lost:\s+(\d+)/),
    avgMs: number(/Average Latency \(s\):\s+([\d.]+)/) * 1000,
    notNoerror: completed ? 1 - Number(noerror?.[1] ?? 0) / completed : 0,
    latencies,
  };
}

// ---------------------------------------------------------------- rows

interface Row {
  readonly resolver: string;
  readonly answers: string;
  readonly load: 'full' | 'moderate';
  readonly result?: Load;
  readonly upstreamShare?: number;
  memory?: { hwm: number; rss: number } | undefined;
  /** The server process's CPU time per answered query, µs, and the kernel's part of it (10 ms ticks: read it on the full-load rows). */
  readonly cpuUs?: { total: number; system: number } | undefined;
  readonly startMs?: number | undefined;
  readonly unavailable?: string;
  note?: string;
}

const rows: Row[] = [];
const loadLabel = (load: Row['load']) => (load === 'full' ? `full (${CLIENTS} clients, ${FULL_SECONDS} s)` : `-Q ${MODERATE_QPS} (${MODERATE_SECONDS} s)`);

/**
 * One measured row: the load against `server`, and what share of the
 * answers the authoritative server behind it gave during the load.
 */
async function measure(
  row: Omit<Row, 'result' | 'upstreamShare'>,
  server: string,
  queries: string,
  upstream?: Dnsmasq,
  expect?: 'upstream' | 'cache',
  serverPid?: number,
): Promise<Row> {
  checkBudget(`${row.resolver}, ${row.answers}, ${row.load}`);
  const before = upstream ? await upstream.answered() : 0;
  const cpuBefore = cpuSeconds(serverPid);
  const result = dnsperf(server, queries, row.load === 'full' ? { seconds: FULL_SECONDS } : { seconds: MODERATE_SECONDS, rate: MODERATE_QPS });
  const cpuAfter = cpuSeconds(serverPid);
  const after = upstream ? await upstream.answered() : 0;
  // Per query sent: a query the client gave up on (lost) may still have gone upstream.
  const share = upstream && result.sent ? (after - before) / result.sent : undefined;
  const perQuery = (seconds: number) => (seconds * 1e6) / result.completed;
  const cpuUs =
    cpuBefore === undefined || cpuAfter === undefined || result.completed === 0
      ? undefined
      : {
          total: perQuery(cpuAfter.user + cpuAfter.system - cpuBefore.user - cpuBefore.system),
          system: perQuery(cpuAfter.system - cpuBefore.system),
        };
  const measured: Row = { ...row, result, cpuUs, ...(share === undefined ? {} : { upstreamShare: share }) };
  if (share !== undefined && expect === 'upstream' && share < 0.95)
    measured.note = `only ${(share * 100).toFixed(1)} % of the answers came from upstream: not an upstream-path row`;
  if (share !== undefined && expect === 'cache' && share > 0.05)
    measured.note = `${(share * 100).toFixed(1)} % of the answers came from upstream: not a warm-cache row`;
  rows.push(measured);
  return measured;
}

function nft(args: readonly string[], input?: string): string {
  return execFileSync('nft', args, { input, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 256 << 20 }).toString();
}

/** Elements now in the sets of `table` whose names match `pattern`. */
function elementsIn(table: string, pattern: RegExp): number {
  const json = JSON.parse(nft(['-j', 'list', 'table', 'inet', table])) as { nftables: { set?: { name: string; elem?: unknown[] } }[] };
  return json.nftables.reduce((sum, item) => sum + (item.set && pattern.test(item.set.name) ? (item.set.elem?.length ?? 0) : 0), 0);
}

// ---------------------------------------------------------------- egressd

/** A numeric field of egressd's JSON log that says how long loading the list took, if it logs one. */
function listLoadFromLog(log: string): { ms: number; where: string } | undefined {
  for (const line of log.split('\n')) {
    if (!line.startsWith('{')) continue;
    let entry: Record<string, unknown>;
    try {
      entry = JSON.parse(line) as Record<string, unknown>;
    } catch {
      continue;
    }
    for (const [key, value] of Object.entries(entry)) {
      if (typeof value === 'number' && /load|index|names|list/i.test(key) && /ms$/i.test(key))
        return { ms: value, where: `${typeof entry['event'] === 'string' ? entry['event'] : '?'}.${key}` };
    }
  }
  return undefined;
}

interface EgressdRun {
  readonly rows: Row[];
  readonly reason?: string;
  readonly listLoad?: { ms: number; where: string } | undefined;
  readonly learned?: number | undefined;
  /** The resolver's own counters of set writes, from its start (priming included). */
  readonly writes?: string | undefined;
}

/** What the running resolver says it wrote into the sets (its control socket's status), or undefined if it cannot say. */
async function setWrites(): Promise<string | undefined> {
  try {
    const control = (await import(pathToFileURL(join(ROOT, 'dist/resolver/control.js')).href)) as typeof import('../src/resolver/control.js');
    const asked = await control.askResolver({ op: 'status' }, { path: control.controlSocketPath() });
    if (!asked.running || !asked.reply.ok || asked.reply.op !== 'status') return undefined;
    const c = asked.reply.resolver as Record<string, number | undefined>;
    return `set writes since start: ${c['elementsWritten'] ?? '?'} elements in ${c['transactions'] ?? '?'} transactions, ${c['writesSkipped'] ?? '?'} skipped as held`;
  } catch {
    return undefined;
  }
}

async function egressd(client: DnsClient, dir: string, answers: 'upstream' | 'warm', authority: Dnsmasq, queries: string, probe: string): Promise<EgressdRun> {
  const resolver = '(3) egressd resolver';
  const label = answers === 'upstream' ? 'all from upstream (TTL 0)' : 'warm cache';
  const unavailable = (reason: string): EgressdRun => {
    for (const load of ['full', 'moderate'] as const) rows.push({ resolver, answers: label, load, unavailable: reason });
    return { rows: [], reason };
  };
  if (!existsSync(DAEMON) || !existsSync(CLI)) return unavailable('dist/ is not built: npm run build');
  const policy = join(dir, `policy-${answers}`);
  const state = join(dir, `state-${answers}`);
  mkdirSync(policy, { recursive: true });
  mkdirSync(state, { recursive: true });
  copyFileSync(LIST, join(policy, 'tracking.txt'));
  writeFileSync(
    join(policy, '00-bench.yaml'),
    [
      'defaults: {egress: allow, log: {denials: false}}',
      `dns: {upstreams: ["${authority.address}#53"], deniedAnswer: "true", listen: ["${EGRESSD}"]}`,
      'lists:',
      '  tracking: {file: tracking.txt, format: plain}',
      'deny:',
      '  - to: ["@tracking"]',
      '',
    ].join('\n'),
  );
  const env = { ...process.env, EGRESSD_STATE_DIR: state };
  checkBudget('egressctl apply');
  const applied = spawnSync(process.execPath, [CLI, 'apply', policy], { env, timeout: 120_000, maxBuffer: 64 << 20 });
  if (applied.status !== 0) {
    const said = `${applied.stderr.toString()}\n${applied.stdout.toString()}`
      .replaceAll(`${policy}/`, '')
      .replaceAll(policy, 'DIR')
      .trim()
      .split('\n')
      .slice(0, 3)
      .join(' / ');
    return unavailable(`egressctl apply exited ${applied.status ?? applied.signal}: ${said.slice(0, 240)}`);
  }
  const since = performance.now();
  const { child, output } = startProcess(process.execPath, [...nodeArgs(), DAEMON, 'resolver', '--policy', policy], env);
  try {
    const startMs = await firstAnswer(client, EGRESSD, probe, since, () => child.exitCode === null && child.signalCode === null, 60_000);
    if (startMs === undefined) {
      const said = output().replaceAll(policy, 'DIR').trim().split('\n').slice(0, 3).join(' / ');
      return unavailable(
        `\`egressd resolver\` ${child.exitCode === null && child.signalCode === null ? 'did not answer within 60 s' : `exited (${child.exitCode ?? child.signalCode ?? '?'})`}: ${said.slice(0, 240)}`,
      );
    }
    if (answers === 'warm') dnsperf(EGRESSD, queries, { runs: 1 });
    const mine: Row[] = [];
    for (const load of ['full', 'moderate'] as const)
      mine.push(
        await measure({ resolver, answers: label, load, startMs }, EGRESSD, queries, authority, answers === 'upstream' ? 'upstream' : 'cache', child.pid),
      );
    const mem = memory(child.pid);
    for (const row of mine) row.memory = mem;
    const writes = await setWrites();
    let learned: number | undefined;
    try {
      learned = elementsIn('egressd', /_dns4/);
    } catch {
      learned = undefined;
    }
    return { rows: mine, listLoad: listLoadFromLog(output()), learned, writes };
  } finally {
    await stopProcess(child);
  }
}

/** Extra Node.js flags for egressd's resolver, e.g. `EGD_BENCH_RESOLVER_NODE_ARGS='--cpu-prof --cpu-prof-dir=/tmp/prof'` to see where its time goes. */
const nodeArgs = (): string[] => (process.env.EGD_BENCH_RESOLVER_NODE_ARGS ?? '').split(' ').filter((arg) => arg !== '');

// ---------------------------------------------------------------- set updates

interface Update {
  readonly path: string;
  readonly samples?: readonly number[];
  /** For a difference of two paths: p50 and p99 of each, and n of each. */
  readonly difference?: { with: readonly number[]; without: readonly number[] };
  readonly unavailable?: string;
}

const updateAddress = (i: number) => `198.19.${(i >> 8) & 255}.${i & 255}`;

interface SetElementWriter {
  add(writes: readonly { set: string; address: string; timeoutMs: number }[]): void;
  close(): void;
}

async function writerUpdates(offset: number): Promise<Update> {
  const path = "egressd's writer (src/nft/set-elements.ts), one answer, one address";
  if (!existsSync(WRITER)) return { path, unavailable: 'src/nft/set-elements.ts is not in this tree' };
  let writer: SetElementWriter;
  try {
    const module = (await import(pathToFileURL(WRITER).href)) as { openSetElementWriter?: (table: { family: 'inet'; name: string }) => SetElementWriter };
    if (typeof module.openSetElementWriter !== 'function') return { path, unavailable: 'src/nft/set-elements.ts exports no openSetElementWriter' };
    writer = module.openSetElementWriter({ family: 'inet', name: TABLE });
  } catch (error) {
    return { path, unavailable: `opening it failed: ${(error as Error).message.split('\n')[0] ?? ''}` };
  }
  const samples: number[] = [];
  const until = performance.now() + UPDATE_LIMITS.writer.seconds * 1000;
  try {
    for (let i = 0; i < UPDATE_LIMITS.writer.n && performance.now() < until; i++) {
      const start = performance.now();
      writer.add([{ set: 'dns4', address: updateAddress(offset + i), timeoutMs: 60_000 }]);
      samples.push(performance.now() - start);
    }
  } catch (error) {
    return { path, unavailable: `add failed after ${samples.length}: ${(error as Error).message.split('\n')[0] ?? ''}` };
  } finally {
    writer.close();
  }
  return { path, samples };
}

function nftUpdates(offset: number): Update {
  const samples: number[] = [];
  const until = performance.now() + UPDATE_LIMITS.nft.seconds * 1000;
  for (let i = 0; i < UPDATE_LIMITS.nft.n && performance.now() < until; i++) {
    const start = performance.now();
    nft(['add', 'element', 'inet', TABLE, 'dns4', `{ ${updateAddress(offset + i)} timeout 60s }`]);
    samples.push(performance.now() - start);
  }
  return { path: '`nft add element`, a fresh process per answer', samples };
}

/** Queries alternate between dnsmasq with and without the nftset lines; both forward every one (TTL 0, no cache). */
async function dnsmasqUpdates(client: DnsClient, names: readonly string[], offset: number): Promise<Update> {
  const withSets: number[] = [];
  const without: number[] = [];
  let failed = 0;
  const until = performance.now() + UPDATE_LIMITS.dnsmasq.seconds * 1000;
  for (let i = 0; i < UPDATE_LIMITS.dnsmasq.n && performance.now() < until; i++) {
    const name = names[(offset + i) % names.length]!;
    // Which goes first alternates, so neither always meets a warmer path.
    const order = i % 2 === 0 ? ([DNSMASQ_NFTSET, DNSMASQ_PLAIN] as const) : ([DNSMASQ_PLAIN, DNSMASQ_NFTSET] as const);
    for (const server of order) {
      const reply = await client.query(server, name, 5000);
      if (!reply || reply.rcode !== 0) failed++;
      else (server === DNSMASQ_NFTSET ? withSets : without).push(reply.ms);
    }
  }
  return {
    path: "dnsmasq's nftset path: a forwarded query with nftset= minus one without (difference of percentiles)",
    difference: { with: withSets, without },
    ...(failed ? { unavailable: `${failed} queries failed or timed out` } : {}),
  };
}

// ---------------------------------------------------------------- printing

const ms = (x: number | undefined, digits = 3) => (x === undefined || Number.isNaN(x) ? '—' : x.toFixed(digits));

function printRows(): void {
  console.log(
    `Loopback, one namespace; dnsperf ${CLIENTS} clients over ${QUERY_NAMES.toLocaleString('en')} names of the list; full load ${FULL_SECONDS} s per row (dnsperf's 100 queries outstanding), moderate load -Q ${MODERATE_QPS} for ${MODERATE_SECONDS} s. p50/p99 from dnsperf -v at moderate load; "avg" is dnsperf's average. "from upstream": answers the authoritative server gave during the row ÷ queries dnsperf sent. Memory: VmHWM / VmRSS after the rows; CPU µs/query: the server process's user + system time during the row ÷ answers, the kernel's part in parentheses (10 ms ticks); start: process start → first answer.\n`,
  );
  console.log(
    '| resolver | answers | load | qps | from upstream | p50 ms | p99 ms | avg ms | lost | not NOERROR | VmHWM / VmRSS MB | CPU µs/query | start ms |',
  );
  console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
  for (const row of rows) {
    if (row.unavailable) {
      console.log(`| ${row.resolver} | ${row.answers} | ${loadLabel(row.load)} | not available (${row.unavailable.replace(/\|/g, '/')}) | | | | | | | | | |`);
      continue;
    }
    const r = row.result!;
    const sorted = r.latencies;
    console.log(
      [
        row.resolver,
        row.answers,
        loadLabel(row.load),
        r.qps.toFixed(0),
        row.upstreamShare === undefined ? '—' : `${(row.upstreamShare * 100).toFixed(1)} %`,
        ms(sorted && percentile(sorted, 50)),
        ms(sorted && percentile(sorted, 99)),
        ms(r.avgMs),
        `${r.lost}/${r.sent}`,
        `${(r.notNoerror * 100).toFixed(1)} %`,
        row.memory ? `${row.memory.hwm.toFixed(1)} / ${row.memory.rss.toFixed(1)}` : '—',
        row.cpuUs ? `${row.cpuUs.total.toFixed(1)} (${row.cpuUs.system.toFixed(1)} system)` : '—',
        ms(row.startMs, 0),
      ]
        .join(' | ')
        .replace(/^/, '| ')
        .concat(' |'),
    );
    if (row.note) console.log(`|  | ↳ ${row.note} | | | | | | | | | | | |`);
  }
}

function printUpdates(groups: readonly { label: string; updates: readonly Update[] }[]): void {
  console.log("\nOne answer's set update (element timeout 60 s, into `dns4`, `typeof ip daddr; flags timeout`)\n");
  console.log('| path | table also holds | n | p50 ms | p99 ms | max ms |');
  console.log('|---|---|---|---|---|---|');
  for (const { label, updates } of groups) {
    for (const u of updates) {
      if (u.difference) {
        const a = [...u.difference.with].sort((x, y) => x - y);
        const b = [...u.difference.without].sort((x, y) => x - y);
        console.log(
          `| ${u.path} | ${label} | ${a.length} + ${b.length} | ${ms(percentile(a, 50) - percentile(b, 50))} (${ms(percentile(a, 50))} − ${ms(percentile(b, 50))}) | ${ms(percentile(a, 99) - percentile(b, 99))} (${ms(percentile(a, 99))} − ${ms(percentile(b, 99))}) | ${ms(a.at(-1))} |${u.unavailable ? ` ${u.unavailable}` : ''}`,
        );
      } else if (u.samples) {
        const s = [...u.samples].sort((x, y) => x - y);
        console.log(`| ${u.path} | ${label} | ${s.length} | ${ms(percentile(s, 50))} | ${ms(percentile(s, 99))} | ${ms(s.at(-1))} |`);
      } else console.log(`| ${u.path} | ${label} | not available (${u.unavailable ?? '?'}) | | | |`);
    }
  }
}

// ---------------------------------------------------------------- the run

async function inner(dir: string): Promise<void> {
  execFileSync('ip', ['link', 'set', 'lo', 'up']);
  const list = parseNameList(readFileSync(LIST, 'utf8'), 'plain');
  // Names spread over the whole list; dnsmasq's address= and dnsperf take plain LDH names.
  const plain = [...list.names].filter((n) => /^[a-z0-9-]+(\.[a-z0-9-]+)+$/.test(n));
  const step = Math.floor(plain.length / QUERY_NAMES);
  const names = Array.from({ length: QUERY_NAMES }, (_, i) => plain[i * step]!);
  const queries = join(dir, 'queries.txt');
  writeFileSync(queries, names.map((n) => `${n} A\n`).join(''));
  // 198.18.0.0/15 is for benchmarks: one address per name.
  writeFileSync(join(dir, 'authority.conf'), names.map((n, i) => `address=/${n}/198.18.${i >> 8}.${i & 255}\n`).join(''));
  const nftsets = join(dir, 'nftset.conf');
  writeFileSync(nftsets, [...list.names].map((n) => `nftset=/${n}/4#inet#${TABLE}#dns4,6#inet#${TABLE}#dns6\n`).join(''));
  nft(['-f', '-'], `table inet ${TABLE} {\n\tset dns4 { typeof ip daddr; flags timeout; }\n\tset dns6 { typeof ip6 daddr; flags timeout; }\n}\n`);
  const probe = names[0]!;

  const client = new DnsClient();
  const authFresh = await startDnsmasq(
    client,
    dir,
    'authority-ttl0',
    AUTH_FRESH,
    ['--conf-file=' + join(dir, 'authority.conf'), '--local-ttl=0', '--cache-size=0'],
    probe,
  );
  const authCached = await startDnsmasq(
    client,
    dir,
    'authority-ttl3600',
    AUTH_CACHED,
    ['--conf-file=' + join(dir, 'authority.conf'), '--local-ttl=3600', '--cache-size=0'],
    probe,
  );
  if (egressdWarmOnly) {
    const run = await egressd(client, dir, 'warm', authCached, queries, probe);
    client.close();
    if (run.rows[0] && run.writes) run.rows[0].note = [run.rows[0].note, run.writes].filter(Boolean).join('; ');
    printRows();
    if (run.reason) console.log(run.reason);
    return;
  }
  const forwardMax = '--dns-forward-max=1000';

  const direct = '(1) authoritative dnsmasq, direct';
  for (const load of ['full', 'moderate'] as const)
    await measure({ resolver: direct, answers: 'itself', load }, AUTH_CACHED, queries, authCached, undefined, authCached.child.pid);

  const plainDnsmasq = await startDnsmasq(client, dir, 'forward-plain', DNSMASQ_PLAIN, [`--server=${AUTH_FRESH}#53`, '--cache-size=0', forwardMax], probe);
  const plainRows: Row[] = [];
  for (const load of ['full', 'moderate'] as const)
    plainRows.push(
      await measure(
        { resolver: 'dnsmasq forwarding, no nftset= (reference)', answers: 'all from upstream (TTL 0, --cache-size=0)', load, startMs: plainDnsmasq.startMs },
        DNSMASQ_PLAIN,
        queries,
        authFresh,
        undefined,
        plainDnsmasq.child.pid,
      ),
    );
  for (const row of plainRows) row.memory = memory(plainDnsmasq.child.pid);

  const nftsetDnsmasq = await startDnsmasq(
    client,
    dir,
    'forward-nftset',
    DNSMASQ_NFTSET,
    [`--server=${AUTH_FRESH}#53`, '--cache-size=0', forwardMax, `--conf-file=${nftsets}`],
    probe,
  );
  const fresh: Row[] = [];
  for (const load of ['full', 'moderate'] as const)
    fresh.push(
      await measure(
        { resolver: '(2) dnsmasq + nftset= list', answers: 'all from upstream (TTL 0, --cache-size=0)', load, startMs: nftsetDnsmasq.startMs },
        DNSMASQ_NFTSET,
        queries,
        authFresh,
        undefined,
        nftsetDnsmasq.child.pid,
      ),
    );
  for (const row of fresh) row.memory = memory(nftsetDnsmasq.child.pid);
  fresh[0]!.note = [fresh[0]!.note, `${elementsIn(TABLE, /^dns4$/).toLocaleString('en')} elements in ${TABLE} dns4 after these rows`]
    .filter(Boolean)
    .join('; ');

  // dnsmasq's throughput falls with the number of nftset= entries it matches answers against: the same forwarder with only the queried names shows what the list's length costs.
  const fewSets = join(dir, 'nftset-queried.conf');
  writeFileSync(fewSets, names.map((n) => `nftset=/${n}/4#inet#${TABLE}#dns4,6#inet#${TABLE}#dns6\n`).join(''));
  const fewDnsmasq = await startDnsmasq(
    client,
    dir,
    'forward-nftset-queried',
    DNSMASQ_NFTSET_FEW,
    [`--server=${AUTH_FRESH}#53`, '--cache-size=0', forwardMax, `--conf-file=${fewSets}`],
    probe,
  );
  const few = await measure(
    {
      resolver: `dnsmasq + nftset= for the ${QUERY_NAMES.toLocaleString('en')} queried names only (reference)`,
      answers: 'all from upstream (TTL 0, --cache-size=0)',
      load: 'full',
      startMs: fewDnsmasq.startMs,
    },
    DNSMASQ_NFTSET_FEW,
    queries,
    authFresh,
    'upstream',
    fewDnsmasq.child.pid,
  );
  few.memory = memory(fewDnsmasq.child.pid);
  await stopProcess(fewDnsmasq.child);

  const cachingDnsmasq = await startDnsmasq(
    client,
    dir,
    'forward-nftset-cache',
    DNSMASQ_NFTSET_CACHE,
    [`--server=${AUTH_CACHED}#53`, '--cache-size=20000', forwardMax, `--conf-file=${nftsets}`],
    probe,
  );
  dnsperf(DNSMASQ_NFTSET_CACHE, queries, { runs: 1 });
  const warm: Row[] = [];
  for (const load of ['full', 'moderate'] as const)
    warm.push(
      await measure(
        { resolver: '(2) dnsmasq + nftset= list', answers: 'warm cache', load, startMs: cachingDnsmasq.startMs },
        DNSMASQ_NFTSET_CACHE,
        queries,
        authCached,
        undefined,
        cachingDnsmasq.child.pid,
      ),
    );
  for (const row of warm) row.memory = memory(cachingDnsmasq.child.pid);
  await stopProcess(cachingDnsmasq.child);

  // egressd's table adds an output hook to every loopback packet, so its added latency is taken against a direct row measured under it.
  const egressdRuns: EgressdRun[] = [];
  let directUnderTable: Row | undefined;
  for (const [answers, authority] of [
    ['upstream', authFresh],
    ['warm', authCached],
  ] as const) {
    const run = await egressd(client, dir, answers, authority, queries, probe);
    egressdRuns.push(run);
    if (!run.reason && !directUnderTable)
      directUnderTable = await measure(
        { resolver: "(1') authoritative dnsmasq, direct, egressd's table loaded", answers: 'itself', load: 'moderate' },
        AUTH_CACHED,
        queries,
        authCached,
      );
  }
  for (const run of egressdRuns)
    if (run.learned !== undefined && run.rows[0])
      run.rows[0].note = [
        run.rows[0].note,
        `${run.learned.toLocaleString('en')} elements in egressd's _dns4 sets after these rows${run.listLoad ? `; list load ${run.listLoad.ms.toFixed(0)} ms (${run.listLoad.where})` : ''}${run.writes ? `; ${run.writes}` : ''}`,
      ]
        .filter(Boolean)
        .join('; ');
  // Only the bench's table from here on: its set updates meet no other table.
  spawnSync('nft', ['delete', 'table', 'inet', 'egressd']);

  checkBudget('set updates');
  const groups: { label: string; updates: Update[] }[] = [];
  groups.push({ label: 'nothing else', updates: [await writerUpdates(0), nftUpdates(20_000), await dnsmasqUpdates(client, names, 0)] });
  const cidrs = Array.from({ length: CIDRS }, (_, i) => {
    const at = i * 8; // a /30 every 8 addresses of 10.0.0.0/8: no two adjacent, so none merge
    return `10.${(at >> 16) & 255}.${(at >> 8) & 255}.${at & 255}/30`;
  });
  const loadStart = performance.now();
  nft(['-f', '-'], `table inet ${TABLE} {\n\tset cidrs { typeof ip daddr; flags interval; elements = { ${cidrs.join(', ')} } }\n}\n`);
  const cidrLoadMs = performance.now() - loadStart;
  checkBudget('set updates with the CIDR set');
  const big = `a ${CIDRS.toLocaleString('en')}-CIDR interval set`;
  groups.push({ label: big, updates: [await writerUpdates(40_000), nftUpdates(60_000), await dnsmasqUpdates(client, names, 5000)] });
  client.close();

  printRows();
  printUpdates(groups);
  console.log(`\n(${big} loaded with nft -f in ${cidrLoadMs.toFixed(0)} ms.)`);
  printTargets({
    fresh: fresh[0],
    plain: plainRows[0],
    warm: warm[0],
    directMod: rows.find((r) => r.resolver === direct && r.load === 'moderate'),
    directUnderTable,
    egressdRuns,
    groups,
  });
}

function printTargets(m: {
  fresh: Row | undefined;
  plain: Row | undefined;
  warm: Row | undefined;
  directMod: Row | undefined;
  directUnderTable: Row | undefined;
  egressdRuns: readonly EgressdRun[];
  groups: readonly { label: string; updates: readonly Update[] }[];
}): void {
  const [up, cached] = m.egressdRuns;
  const reason = up?.reason ?? cached?.reason;
  const na = `not available${reason ? ` (${reason.slice(0, 120).replace(/\|/g, '/')})` : ''}`;
  const p50 = (row: Row | undefined) => (row?.result?.latencies ? percentile(row.result.latencies, 50) : undefined);
  const lines: [string, string, string, boolean | undefined][] = [];
  const ratio = (egressdRow: Row | undefined, dnsmasqRow: Row | undefined, target: number, what: string): void => {
    if (!egressdRow?.result || !dnsmasqRow?.result) {
      lines.push([what, `≥ ${target} ×`, na, undefined]);
      return;
    }
    const r = egressdRow.result.qps / dnsmasqRow.result.qps;
    lines.push([what, `≥ ${target} ×`, `${r.toFixed(2)} × (${egressdRow.result.qps.toFixed(0)} / ${dnsmasqRow.result.qps.toFixed(0)} qps)`, r >= target]);
  };
  ratio(up?.rows[0], m.fresh, TARGETS.upstream, "upstream path: egressd's qps ÷ dnsmasq's (nftset=, every answer from upstream)");
  ratio(up?.rows[0], m.plain, 1, "for reference, upstream path: egressd's qps ÷ dnsmasq forwarding without nftset= (no target; ≥ 1 shown as met)");
  ratio(cached?.rows[0], m.warm, TARGETS.warm, "warm cache: egressd's qps ÷ dnsmasq's (nftset=, warm cache)");
  const base = p50(m.directUnderTable) ?? p50(m.directMod);
  for (const [run, label] of [
    [up, 'every answer from upstream'],
    [cached, 'warm cache'],
  ] as const) {
    const mine = p50(run?.rows[1]);
    const what = `added p50 latency at -Q ${MODERATE_QPS}, ${label} (egressd p50 − direct p50 under egressd's table)`;
    if (mine === undefined || base === undefined) lines.push([what, `≤ ${TARGETS.addedP50Ms} ms`, na, undefined]);
    else
      lines.push([
        what,
        `≤ ${TARGETS.addedP50Ms} ms`,
        `${(mine - base).toFixed(3)} ms (${mine.toFixed(3)} − ${base.toFixed(3)})`,
        mine - base <= TARGETS.addedP50Ms,
      ]);
  }
  const writer = m.groups.at(-1)?.updates[0];
  const what = `one answer's set update p50, egressd's writer, ${CIDRS.toLocaleString('en')}-CIDR interval set loaded`;
  if (writer?.samples?.length) {
    const v = percentile(
      [...writer.samples].sort((a, b) => a - b),
      50,
    );
    lines.push([what, `≤ ${TARGETS.updateP50Ms} ms`, `${v.toFixed(3)} ms`, v <= TARGETS.updateP50Ms]);
  } else lines.push([what, `≤ ${TARGETS.updateP50Ms} ms`, `not available (${writer?.unavailable ?? '?'})`, undefined]);
  const hwm = Math.max(...m.egressdRuns.flatMap((run) => (run.rows[0]?.memory ? [run.rows[0].memory.hwm] : [])));
  if (Number.isFinite(hwm))
    lines.push(['resolver RSS with the list (VmHWM, the larger of the two runs)', `≤ ${TARGETS.rssMb} MB`, `${hwm.toFixed(1)} MB`, hwm <= TARGETS.rssMb]);
  else lines.push(['resolver RSS with the list', `≤ ${TARGETS.rssMb} MB`, na, undefined]);
  const load = m.egressdRuns.find((run) => run.listLoad)?.listLoad;
  if (load)
    lines.push(["list load (from the resolver's log)", `≤ ${TARGETS.loadMs} ms`, `${load.ms.toFixed(0)} ms (${load.where})`, load.ms <= TARGETS.loadMs]);
  else lines.push(["list load (from the resolver's log)", `≤ ${TARGETS.loadMs} ms`, up?.rows.length ? 'not logged' : na, undefined]);
  console.log('\nTargets (issue 18)\n');
  console.log('| target | wanted | measured | met |');
  console.log('|---|---|---|---|');
  for (const [target, wanted, measured, met] of lines) console.log(`| ${target} | ${wanted} | ${measured} | ${met === undefined ? '—' : met ? 'yes' : 'NO'} |`);
}

if (values.inner) {
  let interrupted = false;
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      if (interrupted) return;
      interrupted = true;
      console.error(`bench/resolver.ts: ${signal}, stopping its servers`);
      printRows();
      stopAll();
      process.exit(130);
    });
  }
  const watchdog = setTimeout(() => {
    console.error(`bench/resolver.ts: time limit (${BUDGET_MS / 1000} s) reached; what was measured so far:`);
    printRows();
    stopAll();
    process.exit(1);
  }, BUDGET_MS + 20_000);
  try {
    await inner(values.inner);
  } finally {
    clearTimeout(watchdog);
    stopAll();
  }
} else {
  if (process.getuid?.() !== 0) {
    console.error('bench/resolver.ts needs root (it creates a network namespace)');
    process.exit(2);
  }
  const missing = ['dnsperf', 'dnsmasq', 'nft'].filter((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0);
  if (missing.length) {
    console.error(
      `bench/resolver.ts needs ${missing.join(', ')}: run it through \`npm run bench\`, which installs them (scripts/setup.sh --bench), or apt-get install -y ${missing.join(' ')}`,
    );
    process.exit(2);
  }
  // egressd's rows run the built daemon and CLI: build them from this tree first.
  const build = spawnSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, stdio: 'inherit' });
  if (build.status !== 0) console.error("bench/resolver.ts: the build failed; egressd's rows use whatever dist/ holds");
  const root = mkdtempSync(join(tmpdir(), 'egd-resolver-bench-'));
  process.exitCode = runInOwnNamespace(
    'egd-dns-bench',
    fileURLToPath(import.meta.url),
    root,
    ['--inner', root, ...(quick ? ['--quick'] : []), ...(egressdWarmOnly ? ['--egressd-warm'] : [])],
    {
      timeoutMs: BUDGET_MS + 60_000,
    },
  );
}
