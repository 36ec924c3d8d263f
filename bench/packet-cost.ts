/**
 * Per-packet cost of the table: new TCP connections (IPv6) per second from a
 * "host" namespace to a server in an "internet" namespace, with
 *   (a) no table,
 *   (a') no egressd table, but connection tracking on, as on any host with a
 *       stateful firewall (a one-rule table: ct state established accept),
 *   (b) egressd's table for a policy without a default deny, the shape of the
 *       shipped one: 100,000 CIDRs in the global deny list and 200 apps with
 *       explicit allow/deny rules and default allow. No ct expression, so
 *       conntrack stays off;
 *   (b') the same, but the 200 apps are allow-lists with `default: deny`: the
 *       table accepts established connections before each default deny, so
 *       conntrack is on;
 *   (c) a strawman: one rule per CIDR, 10,000 rules;
 *   (h) an output chain with no rules: what any nftables egress filter pays
 *       before its first rule, so that (b) × (h) is what egressd's rules cost;
 *   (b+sd) (b) with a system domain member found by user: the table then
 *       drops SYN-ACKs sent from no socket (SYN cookies), one rule more for
 *       every packet; paired against (b).
 * In (b) and (b') the connecting process is in none of the apps, so each
 * packet walks every dispatch lookup and the deny sets. Target: (b) ≥ 0.95 ×
 * (a); (b') is measured against (a'), since the conntrack cost is its own.
 *
 * The load is all C, so that the table's cost is not hidden under a
 * runtime's: wrk (Debian's) opens a connection per request, 64 at a time on
 * two threads, against bench/conn-server.c, which answers and closes. Both
 * CPUs are then busy, so connections per second measure CPU per connection.
 * Three measurements, each with its own table:
 *   1. rounds: every configuration in turn, order alternating by round;
 *   2. paired: (b) against (a) in blocks of four one-second runs, A B B A,
 *      the loaded table switched dormant (hooks unregistered: for a packet,
 *      no table) and back, so that the machine's drift — ±10 % between runs
 *      seconds apart on this VM — cancels within each block. Likewise (b)
 *      against (h), both loaded and one switched dormant as the other wakes
 *      (one transaction), and (h) against (a);
 *   3. profile: perf samples the whole machine under each table's load; the
 *      share of busy CPU inside netfilter's hooks is the table's cost per
 *      connection, and 1 − share what that leaves of (a)'s rate. A share of
 *      samples within one run does not drift with the machine.
 *
 *   npx tsx bench/packet-cost.ts [--seconds 3] [--rounds 3] [--blocks 30] [--profile 5]   (as root; --blocks per pair)
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { compile } from '../src/compile/compile.js';
import { renderText } from '../src/compile/ruleset.js';
import { loadPolicyOrThrow } from '../src/policy/load.js';
import { median, medianWithInterval } from './lib/stats.js';

const { values } = parseArgs({
  options: {
    seconds: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '3' },
    blocks: { type: 'string', default: '30' },
    profile: { type: 'string', default: '5' },
  },
});
const seconds = Number(values.seconds);
const rounds = Number(values.rounds);
const blocks = Number(values.blocks);
const profileSeconds = Number(values.profile);
for (const [flag, value] of Object.entries({ seconds, rounds, blocks, profile: profileSeconds })) {
  if (!Number.isInteger(value) || value < 0) {
    console.error(`bench/packet-cost.ts: --${flag} must be a whole number, 0 or more`);
    process.exit(2);
  }
}
const SERVER_ADDRESS = '2001:db8::2';
const PORT = 8080;
/** Two wrk threads and two server processes: both CPUs busy, neither side alone the limit. */
const THREADS = 2;
const CONNECTIONS = 64;
/** After loading a table the kernel frees the last one's memory in the background. */
const SETTLE_AFTER_LOAD_MS = 1000;
const SETTLE_AFTER_SWITCH_MS = 200;
const PAIRED_RUN_SECONDS = 1;

/**
 * egressd's table: 100,000 CIDRs denied for everyone, and 200 apps. With
 * `defaultDeny` the apps are allow-lists (`default: deny`); without it they
 * allow and deny explicitly, and allow the rest.
 */
function egressdTable(dir: string, defaultDeny: boolean, systemDomainByUser = false): string {
  // Kept clear of 2001:db8::/64, where the traffic is.
  const cidrs = Array.from({ length: 100_000 }, (_, i) => `2001:db8:${((i >> 12) + 0x100).toString(16)}:${(i & 0xfff).toString(16)}::/64`);
  writeFileSync(join(dir, 'cidrs.txt'), `${cidrs.join('\n')}\n`);
  const allow = (i: number) => `      - allow: [198.51.100.${i % 250}, "app${i}.example.org"]\n        ports: [443]`;
  const deny = (i: number) => `      - deny: ["tracker${i}.example.net", 192.0.2.${i % 250}]\n      - deny: any\n        proto: udp\n        ports: [443]`;
  const apps = Array.from(
    { length: 200 },
    (_, i) =>
      `  app${i}:\n    identity: [{user: ${30000 + i}}, {cgroup: "bench/app${i}"}]\n    default: ${defaultDeny ? 'deny' : 'allow'}\n    rules:\n${defaultDeny ? allow(i) : `${allow(i)}\n${deny(i)}`}`,
  );
  writeFileSync(
    join(dir, '00.yaml'),
    `defaults: {egress: allow, log: {denials: false}}\nlists:\n  cidrs: {file: cidrs.txt}\ndeny:\n  - to: ["@cidrs", 203.0.113.0/24]\napps:\n${apps.join('\n')}\n${
      // A member found by user: the table drops SYN-ACKs sent from no socket (SYN cookies), one more rule for every packet.
      systemDomainByUser ? 'systemDomains:\n  offline: {members: [{user: 29999}]}\n' : ''
    }`,
  );
  const { policy } = loadPolicyOrThrow(dir);
  const text = renderText(compile(policy, { users: new Map(), groups: new Map(), cgroups: [] }).ruleset);
  // What separates the two rows: whether the table turns conntrack on.
  if (/\bct state\b/.test(text) !== defaultDeny)
    throw new Error(`internal: the ${defaultDeny ? 'default-deny' : 'default-allow'} table ${defaultDeny ? 'lacks' : 'has'} a ct expression`);
  if (text.includes('jump syn_cookies') !== systemDomainByUser) throw new Error('internal: the SYN-cookie drop is not where the system domain puts it');
  return text;
}

function strawmanTable(): string {
  const rules = Array.from({ length: 10_000 }, (_, i) => `\t\tip6 daddr 2001:db8:${((i >> 12) + 0x100).toString(16)}:${(i & 0xfff).toString(16)}::/64 drop`);
  return `table inet strawman {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n${rules.join('\n')}\n\t}\n}\n`;
}

if (process.getuid?.() !== 0) {
  console.error('bench/packet-cost.ts needs root (it creates network namespaces)');
  process.exit(2);
}
const missing = ['wrk', 'cc', 'perf'].filter((tool) => spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0);
if (missing.length) {
  console.error(`bench/packet-cost.ts needs ${missing.join(', ')}: run it through \`npm run bench\`, which installs them (scripts/setup.sh --bench)`);
  process.exit(2);
}
const id = randomBytes(3).toString('hex');
const host = `egdb${id}-h`;
const inet = `egdb${id}-i`;
const dir = mkdtempSync(join(tmpdir(), 'egd-pkt-bench-'));
const sh = (args: string[]) => execFileSync(args[0]!, args.slice(1), { stdio: 'pipe' });
const inNs = (ns: string, args: string[], input?: string) =>
  execFileSync('nsenter', [`--net=/run/netns/${ns}`, ...args], { input, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 64 << 20 });

/** wrk in the host namespace for `runSeconds`: a new connection for every request. */
const wrk = (runSeconds: number) => [
  `--net=/run/netns/${host}`,
  'wrk',
  `-t${THREADS}`,
  `-c${CONNECTIONS}`,
  `-d${runSeconds}s`,
  '--timeout',
  '2s',
  '-H',
  'Connection: close',
  `http://[${SERVER_ADDRESS}]:${PORT}/`,
];

/** The rate wrk printed; throws when any connection failed. */
function wrkRate(out: string, what: string): number {
  const rate = /^Requests\/sec:\s+([\d.]+)/m.exec(out);
  const errors = /^\s+Socket errors: (.*)$/m.exec(out) ?? /^\s+Non-2xx.*$/m.exec(out);
  if (!rate || errors) throw new Error(`${what}: wrk ${errors ? `saw failed connections (${errors[0].trim()})` : 'printed no rate'}:\n${out}`);
  return Number(rate[1]);
}

/** Connections per second over `runSeconds` of wrk from the host namespace; throws when any failed. */
function connectionsPerSecond(runSeconds: number, what: string): number {
  return wrkRate(execFileSync('nsenter', wrk(runSeconds), { stdio: ['ignore', 'pipe', 'pipe'] }).toString(), what);
}

/** Replaces the host namespace's ruleset with `text` (none: no table) and waits for the kernel to settle. */
async function loadTable(text: string | undefined): Promise<void> {
  spawnSync('nsenter', [`--net=/run/netns/${host}`, 'nft', 'flush', 'ruleset']);
  if (text) inNs(host, ['nft', '-f', '-'], text);
  await sleep(SETTLE_AFTER_LOAD_MS);
}

const tableName = (text: string) => /^table (\S+ \S+) \{/.exec(text)![1]!;

/**
 * `measured` (B) against `against` (A; no table when undefined) in `blocks`
 * blocks of A B B A, one second each. Both tables are loaded once; for A the
 * measured one is switched dormant and the other woken, in one transaction,
 * and back for B. Returns one ratio per block: (B + B) / (A + A).
 */
async function pairedRatios(measured: string, against?: string): Promise<number[]> {
  await loadTable(against ? measured + against : measured);
  const switchTo = (table: string, active: boolean) => (active ? `add table ${table}` : `add table ${table} { flags dormant; }`);
  const [measuredTable, againstTable] = [tableName(measured), against && tableName(against)];
  const run = async (measuring: boolean) => {
    const commands = [switchTo(measuredTable, measuring), ...(againstTable ? [switchTo(againstTable, !measuring)] : [])];
    inNs(host, ['nft', commands.join('; ')]);
    await sleep(SETTLE_AFTER_SWITCH_MS);
    return connectionsPerSecond(PAIRED_RUN_SECONDS, `paired, ${measuring ? 'B' : 'A'}`);
  };
  const ratios: number[] = [];
  for (let i = 0; i < blocks; i++) {
    const a1 = await run(false);
    const b1 = await run(true);
    const b2 = await run(true);
    const a2 = await run(false);
    ratios.push((b1 + b2) / (a1 + a2));
  }
  return ratios;
}

/**
 * Busy and total jiffies of all CPUs from a /proc/stat "cpu" line. Steal is
 * left out of both: cpu-clock does not sample while the VM is not running.
 */
function cpuJiffies(line: string): { busy: number; total: number } {
  const [user, nice, system, idle, iowait, irq, softirq] = line.trim().split(/\s+/).slice(1, 8).map(Number);
  const busy = user! + nice! + system! + irq! + softirq!;
  return { busy, total: busy + idle! + iowait! };
}

/**
 * The share of busy CPU spent inside netfilter's hooks (nf_hook_slow and all
 * it calls: for (a') and (b') that includes conntrack's own hooks) while wrk
 * runs against the loaded table. perf samples on the cpu-clock, which ticks
 * on idle CPUs too, so the share of all samples is divided by the busy
 * fraction of the same interval.
 */
async function hookShare(text: string | undefined, name: string): Promise<{ share: number; idle: number }> {
  await loadTable(text);
  const data = join(dir, 'perf.data');
  const load = spawn('nsenter', wrk(profileSeconds + 2), { stdio: ['ignore', 'pipe', 'pipe'] });
  let loadOutput = '';
  load.stdout.on('data', (chunk: Buffer) => (loadOutput += chunk.toString()));
  const loadDone = new Promise<void>((resolve) => load.once('close', () => resolve()));
  await sleep(1000);
  // perf's own workload reads /proc/stat, so that both readings bound exactly
  // the sampled interval (-B: no build-id pass after it).
  const perf = spawnSync(
    'perf',
    ['record', '-e', 'cpu-clock', '-a', '-g', '-B', '-o', data, '--', 'sh', '-c', `head -1 /proc/stat; sleep ${profileSeconds}; head -1 /proc/stat`],
    { stdio: 'pipe' },
  );
  await loadDone;
  if (perf.status !== 0) throw new Error(`${name}: perf record failed: ${perf.stderr.toString()}`);
  wrkRate(loadOutput, `${name}, profiled`);
  const [before, after] = perf.stdout.toString().trim().split('\n').map(cpuJiffies) as [ReturnType<typeof cpuJiffies>, ReturnType<typeof cpuJiffies>];
  const report = spawnSync('perf', ['report', '-i', data, '--stdio', '--children', '--sort', 'symbol', '-g', 'none'], { stdio: 'pipe', maxBuffer: 64 << 20 });
  if (report.status !== 0) throw new Error(`${name}: perf report failed: ${report.stderr.toString()}`);
  // "    3.55%     0.15%  [k] nf_hook_slow   -   -": the first figure includes everything it calls.
  const inHooks = /^\s*([\d.]+)%\s+[\d.]+%\s+\[k\] nf_hook_slow\s/m.exec(report.stdout.toString());
  if (text && !inHooks) throw new Error(`${name}: perf saw no sample in nf_hook_slow; its report began:\n${report.stdout.toString().slice(0, 2000)}`);
  const busy = (after.busy - before.busy) / (after.total - before.total);
  return { share: (inHooks ? Number(inHooks[1]) / 100 : 0) / busy, idle: 1 - busy };
}

function cleanUp(): void {
  server?.kill();
  spawnSync('ip', ['netns', 'del', host]);
  spawnSync('ip', ['netns', 'del', inet]);
  rmSync(dir, { recursive: true, force: true });
}
let server: ReturnType<typeof spawn> | undefined;
// Ctrl-C reaches this process twice under tsx (from the terminal and relayed
// by tsx's parent): the handler stays, so a second signal cannot cut the
// clean-up short.
let interrupted = false;
for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.on(signal, () => {
    if (interrupted) return;
    interrupted = true;
    cleanUp();
    process.exit(130);
  });
}

try {
  const serverBinary = join(dir, 'conn-server');
  sh(['cc', '-O2', '-Wall', '-o', serverBinary, join(import.meta.dirname, 'conn-server.c')]);
  sh(['ip', 'netns', 'add', host]);
  sh(['ip', 'netns', 'add', inet]);
  sh(['ip', 'link', 'add', `veth${id}`, 'netns', host, 'type', 'veth', 'peer', 'name', `vethi${id}`, 'netns', inet]);
  // IPv6, so that every packet is looked up in the 100,000-CIDR set (IPv6 networks).
  inNs(host, ['ip', 'addr', 'add', '2001:db8::1/64', 'dev', `veth${id}`, 'nodad']);
  inNs(inet, ['ip', 'addr', 'add', `${SERVER_ADDRESS}/64`, 'dev', `vethi${id}`, 'nodad']);
  for (const [ns, dev] of [
    [host, `veth${id}`],
    [inet, `vethi${id}`],
  ] as const) {
    inNs(ns, ['ip', 'link', 'set', dev, 'up']);
    inNs(ns, ['ip', 'link', 'set', 'lo', 'up']);
  }
  // The client's closed connections wait out TIME_WAIT; at ~15,000 a second
  // they would use up the default 28,000 ports within seconds. These settings
  // belong to the namespace and go with it.
  inNs(host, ['sysctl', '-q', '-w', 'net.ipv4.tcp_tw_reuse=1', 'net.ipv4.ip_local_port_range=1024 65535']);
  const started = spawn('nsenter', [`--net=/run/netns/${inet}`, serverBinary, SERVER_ADDRESS, String(PORT), String(THREADS)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  server = started;
  await new Promise<void>((resolve, reject) => {
    started.stdout.once('data', () => resolve());
    started.once('exit', (code) => reject(new Error(`conn-server exited (${code})`)));
  });
  const conntrackOnly =
    'table inet stateful {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n\t\tct state established,related accept\n\t}\n}\n';
  const NO_TABLE = '(a) no table';
  const CONNTRACK_ONLY = "(a') no egressd table, conntrack on";
  const EGRESSD = '(b) egressd, no default deny (conntrack off): 100,000 CIDRs + 200 apps';
  const HOOK_ONLY = '(h) an output chain with no rules';
  const EGRESSD_SD = '(b+sd) (b) with a system domain member found by user (SYN cookies dropped)';
  const tables: Record<string, string | undefined> = {
    [NO_TABLE]: undefined,
    [CONNTRACK_ONLY]: conntrackOnly,
    [EGRESSD]: egressdTable(dir, false),
    // Named apart, so that it and (b) can be loaded together and switched in one transaction (pairedRatios).
    [EGRESSD_SD]: egressdTable(dir, false, true).replace(/^table inet egressd \{/, 'table inet egressd_sd {'),
    "(b') egressd, 200 apps with default deny (conntrack on): 100,000 CIDRs + 200 apps": egressdTable(dir, true),
    '(c) strawman: 10,000 rules, one per CIDR': strawmanTable(),
    [HOOK_ONLY]: 'table inet hook_only {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n\t}\n}\n',
  };
  const load = `wrk, ${THREADS} threads, ${CONNECTIONS} connections at a time, one request each, against bench/conn-server.c`;

  if (rounds > 0 && seconds > 0) {
    const results = new Map<string, number[]>(Object.keys(tables).map((k) => [k, []]));
    for (let round = 0; round < rounds; round++) {
      // Alternate the order, so that drift on a shared machine does not favour one configuration.
      const order = round % 2 === 0 ? Object.entries(tables) : Object.entries(tables).reverse();
      for (const [name, text] of order) {
        await loadTable(text);
        results.get(name)!.push(connectionsPerSecond(seconds, name));
      }
    }
    const base = results.get(NO_TABLE)!;
    const stateful = results.get(CONNTRACK_ONLY)!;
    console.log(
      `1. Rounds: new TCP connections per second, host → internet namespace (${load}), ${seconds} s × ${rounds} rounds; target (b) ≥ 0.95 × (a), (b') against (a')`,
    );
    console.log('"× (a)" is the median of the per-round ratios, which cancels drift between rounds.\n');
    console.log("| configuration | connections/s (median) | min–max | × (a) | × (a') |");
    console.log('|---|---|---|---|---|');
    for (const [name, samples] of results) {
      const ratio = (to: number[]) => median(samples.map((x, i) => x / to[i]!)).toFixed(3);
      console.log(
        `| ${name} | ${median(samples).toFixed(0)} | ${Math.min(...samples).toFixed(0)}–${Math.max(...samples).toFixed(0)} | ${ratio(base)} | ${ratio(stateful)} |`,
      );
    }
  }

  if (blocks > 0) {
    // (b) × (h) is what egressd's rules cost; (h) × (a) what registering any output hook costs.
    const pairs: [string, string | undefined][] = [
      [EGRESSD, undefined],
      [EGRESSD, HOOK_ONLY],
      [HOOK_ONLY, undefined],
      [EGRESSD_SD, EGRESSD],
    ];
    console.log(
      `\n2. Paired: ${blocks} blocks of four ${PAIRED_RUN_SECONDS}-s runs, A B B A, B's table switched dormant for A (and A's woken, when A has one); each block's (B + B) / (A + A)\n`,
    );
    console.log('| B | A | blocks | B × A, median | 90 % interval of the median | min–max |');
    console.log('|---|---|---|---|---|---|');
    for (const [measured, against] of pairs) {
      const ratios = await pairedRatios(tables[measured]!, against && tables[against]);
      const { median: mid, low, high } = medianWithInterval(ratios);
      const sorted = [...ratios].sort((x, y) => x - y);
      console.log(
        `| ${measured} | ${against ?? NO_TABLE} | ${blocks} | ${mid.toFixed(3)} | ${low.toFixed(3)}–${high.toFixed(3)} | ${sorted[0]!.toFixed(3)}–${sorted.at(-1)!.toFixed(3)} |`,
      );
    }
  }

  if (profileSeconds > 0) {
    const shares = new Map<string, { share: number; idle: number }>();
    for (const [name, text] of Object.entries(tables)) shares.set(name, await hookShare(text, name));
    const stateful = shares.get(CONNTRACK_ONLY)!.share;
    console.log(
      `\n3. Profile: perf record -a for ${profileSeconds} s under the same load; the share of busy CPU inside netfilter's hooks, and what 1 − share leaves of the rate\n`,
    );
    console.log("| configuration | in hooks, % of busy CPU | idle | ⇒ × (a) | ⇒ × (a') |");
    console.log('|---|---|---|---|---|');
    for (const [name, { share, idle }] of shares) {
      console.log(
        `| ${name} | ${(share * 100).toFixed(2)} | ${(idle * 100).toFixed(1)} % | ${(1 - share).toFixed(3)} | ${((1 - share) / (1 - stateful)).toFixed(3)} |`,
      );
    }
  }
} finally {
  cleanUp();
}
