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
 *   (c) a strawman: one rule per CIDR, 10,000 rules.
 * In (b) and (b') the connecting process is in none of the apps, so each SYN
 * walks every dispatch lookup and the deny sets. Configurations are
 * interleaved over several rounds; the median is shown. Target: (b) ≥ 0.95 ×
 * (a); (b') is measured against (a'), since the conntrack cost is its own.
 *
 * Then (b) once more against (a) within one run (see pairedRatios), which
 * resolves a few per cent where rounds of separate runs cannot.
 *
 *   npx tsx bench/packet-cost.ts [--seconds 3] [--rounds 3] [--paired 60]   (as root)
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { compile } from '../src/compile/compile.js';
import { renderText } from '../src/compile/nft.js';
import { loadPolicyOrThrow } from '../src/policy/load.js';

const { values } = parseArgs({ options: { seconds: { type: 'string', default: '3' }, rounds: { type: 'string', default: '3' }, paired: { type: 'string', default: '60' } } });
const seconds = Number(values.seconds);
const rounds = Number(values.rounds);
const pairedSeconds = Number(values.paired);
/** The paired run switches the table every PHASE_MS and leaves out SETTLE_MS after each switch. */
const PHASE_MS = 1000;
const SETTLE_MS = 200;

const SERVER = `
const net = require('node:net');
net.createServer((s) => { s.on('data', () => s.end('ok')); s.on('error', () => {}); }).listen(8080, '2001:db8::2', () => console.log('ready'));`;
// Opens, writes, reads and closes connections back to back, 16 at a time, for `ms`.
const CONNECT_LOOP = (ms: number) => `
const net = require('node:net');
const until = Date.now() + ${ms};
let done = 0, failed = 0;
function one() {
  if (Date.now() >= until) return;
  const s = net.connect({ host: '2001:db8::2', port: 8080 });
  s.setTimeout(1000);
  s.on('connect', () => s.write('x'));
  s.on('data', () => s.destroy());
  s.on('close', () => { done++; one(); });
  s.on('timeout', () => { failed++; s.destroy(); });
  s.on('error', () => failed++);
}
for (let i = 0; i < 16; i++) one();`;
const CLIENT = `${CONNECT_LOOP(seconds * 1000)}
setTimeout(() => { console.log(JSON.stringify({ done, failed })); process.exit(0); }, ${seconds * 1000} + 1500);`;
// The paired run's client: "time done failed" every 50 ms.
const PAIRED_CLIENT = `${CONNECT_LOOP(pairedSeconds * 1000)}
const tick = setInterval(() => {
  process.stdout.write(Date.now() + ' ' + done + ' ' + failed + '\\n');
  if (Date.now() >= until) { clearInterval(tick); process.exit(0); }
}, 50);`;

/**
 * egressd's table: 100,000 CIDRs denied for everyone, and 200 apps. With
 * `defaultDeny` the apps are allow-lists (`default: deny`); without it they
 * allow and deny explicitly, and allow the rest.
 */
function egressdTable(dir: string, defaultDeny: boolean): string {
  // Kept clear of 2001:db8::/64, where the traffic is.
  const cidrs = Array.from({ length: 100_000 }, (_, i) => `2001:db8:${((i >> 12) + 0x100).toString(16)}:${(i & 0xfff).toString(16)}::/64`);
  writeFileSync(join(dir, 'cidrs.txt'), `${cidrs.join('\n')}\n`);
  const allow = (i: number) => `      - allow: [198.51.100.${i % 250}, "app${i}.example.org"]\n        ports: [443]`;
  const deny = (i: number) => `      - deny: ["tracker${i}.example.net", 192.0.2.${i % 250}]\n      - deny: any\n        proto: udp\n        ports: [443]`;
  const apps = Array.from(
    { length: 200 },
    (_, i) => `  app${i}:\n    identity: [{user: ${30000 + i}}, {cgroup: "bench/app${i}"}]\n    default: ${defaultDeny ? 'deny' : 'allow'}\n    rules:\n${defaultDeny ? allow(i) : `${allow(i)}\n${deny(i)}`}`,
  );
  writeFileSync(join(dir, '00.yaml'), `defaults: {egress: allow, log: {denials: false}}\nlists:\n  cidrs: {file: cidrs.txt}\ndeny:\n  - to: ["@cidrs", 203.0.113.0/24]\napps:\n${apps.join('\n')}\n`);
  const { policy } = loadPolicyOrThrow(dir);
  const text = renderText(compile(policy, { users: new Map(), groups: new Map(), cgroups: [] }).ruleset);
  // What separates the two rows: whether the table turns conntrack on.
  if (/\bct state\b/.test(text) !== defaultDeny) throw new Error(`internal: the ${defaultDeny ? 'default-deny' : 'default-allow'} table ${defaultDeny ? 'lacks' : 'has'} a ct expression`);
  return text;
}

function strawmanTable(): string {
  const rules = Array.from({ length: 10_000 }, (_, i) => `\t\tip6 daddr 2001:db8:${((i >> 12) + 0x100).toString(16)}:${(i & 0xfff).toString(16)}::/64 drop`);
  return `table inet strawman {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n${rules.join('\n')}\n\t}\n}\n`;
}

/**
 * (b) against (a) within one run: the table stays loaded and is switched
 * dormant — its hooks unregistered, which for a packet is no table at all —
 * and back every PHASE_MS, while one client keeps connecting. Each phase
 * with the table is compared with the mean of the phases without it on
 * either side, SETTLE_MS after each switch left out. Rounds of separate runs
 * seconds apart see this machine drift by ±10 %; adjacent phases a second
 * apart mostly do not, which a 2–5 % effect needs. Returns one ratio per phase
 * with the table, and the client's failed connections.
 */
async function pairedRatios(host: string, text: string): Promise<{ ratios: number[]; failed: number }> {
  spawnSync('nsenter', [`--net=/run/netns/${host}`, 'nft', 'flush', 'ruleset']);
  inNs(host, ['nft', '-f', '-'], text);
  const table = /^table (\S+ \S+) \{/.exec(text)![1]!;
  const client = spawn('nsenter', [`--net=/run/netns/${host}`, process.execPath, '-e', PAIRED_CLIENT], { stdio: ['ignore', 'pipe', 'inherit'] });
  let output = '';
  client.stdout!.on('data', (chunk: Buffer) => (output += chunk.toString()));
  const exited = new Promise<void>((resolve) => client.once('exit', () => resolve()));
  const switches: { at: number; active: boolean }[] = [{ at: Date.now(), active: true }];
  const end = Date.now() + pairedSeconds * 1000;
  while (Date.now() + PHASE_MS < end) {
    await new Promise((resolve) => setTimeout(resolve, PHASE_MS));
    const active = !switches.at(-1)!.active;
    inNs(host, ['nft', active ? `add table ${table}` : `add table ${table} { flags dormant; }`]);
    switches.push({ at: Date.now(), active });
  }
  await exited;
  const samples = output
    .trim()
    .split('\n')
    .map((line) => line.split(' ').map(Number) as [number, number, number]);
  const rate = (from: number, to: number) => {
    const inside = samples.filter(([t]) => t >= from && t <= to);
    if (inside.length < 2) return undefined;
    const [t0, d0] = inside[0]!;
    const [t1, d1] = inside.at(-1)!;
    return (d1 - d0) / (t1 - t0);
  };
  const phases = switches.slice(0, -1).map((s, i) => ({ active: s.active, rate: rate(s.at + SETTLE_MS, switches[i + 1]!.at) }));
  const ratios: number[] = [];
  for (let i = 1; i + 1 < phases.length; i++) {
    const [before, with_, after] = [phases[i - 1]!, phases[i]!, phases[i + 1]!];
    if (!with_.active || with_.rate === undefined || before.rate === undefined || after.rate === undefined) continue;
    ratios.push(with_.rate / ((before.rate + after.rate) / 2));
  }
  return { ratios, failed: samples.at(-1)?.[2] ?? 0 };
}

const id = randomBytes(3).toString('hex');
const host = `egdb${id}-h`;
const inet = `egdb${id}-i`;
const dir = mkdtempSync(join(tmpdir(), 'egd-pkt-bench-'));
const sh = (args: string[]) => execFileSync(args[0]!, args.slice(1), { stdio: 'pipe' });
const inNs = (ns: string, args: string[], input?: string) => execFileSync('nsenter', [`--net=/run/netns/${ns}`, ...args], { input, stdio: ['pipe', 'pipe', 'pipe'], maxBuffer: 64 << 20 });

if (process.getuid?.() !== 0) {
  console.error('bench/packet-cost.ts needs root (it creates network namespaces)');
  process.exit(2);
}
const server = (() => {
  sh(['ip', 'netns', 'add', host]);
  sh(['ip', 'netns', 'add', inet]);
  sh(['ip', 'link', 'add', `veth${id}`, 'netns', host, 'type', 'veth', 'peer', 'name', `vethi${id}`, 'netns', inet]);
  // IPv6, so that every SYN is looked up in the 100,000-CIDR set (IPv6 networks).
  inNs(host, ['ip', 'addr', 'add', '2001:db8::1/64', 'dev', `veth${id}`, 'nodad']);
  inNs(inet, ['ip', 'addr', 'add', '2001:db8::2/64', 'dev', `vethi${id}`, 'nodad']);
  for (const [ns, dev] of [[host, `veth${id}`], [inet, `vethi${id}`]] as const) {
    inNs(ns, ['ip', 'link', 'set', dev, 'up']);
    inNs(ns, ['ip', 'link', 'set', 'lo', 'up']);
  }
  return spawn('nsenter', [`--net=/run/netns/${inet}`, process.execPath, '-e', SERVER], { stdio: ['ignore', 'pipe', 'inherit'] });
})();

try {
  await new Promise<void>((resolve) => server.stdout!.once('data', () => resolve()));
  const conntrackOnly = 'table inet stateful {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n\t\tct state established,related accept\n\t}\n}\n';
  const tables: Record<string, string | undefined> = {
    '(a) no table': undefined,
    "(a') no egressd table, conntrack on": conntrackOnly,
    "(b) egressd, no default deny (conntrack off): 100,000 CIDRs + 200 apps": egressdTable(dir, false),
    "(b') egressd, 200 apps with default deny (conntrack on): 100,000 CIDRs + 200 apps": egressdTable(dir, true),
    '(c) strawman: 10,000 rules, one per CIDR': strawmanTable(),
  };
  const results = new Map<string, number[]>(Object.keys(tables).map((k) => [k, []]));
  for (let round = 0; round < rounds; round++) {
    // Alternate the order, so that drift on a shared machine does not favour one configuration.
    const order = round % 2 === 0 ? Object.entries(tables) : Object.entries(tables).reverse();
    for (const [name, text] of order) {
      spawnSync('nsenter', [`--net=/run/netns/${host}`, 'nft', 'flush', 'ruleset']);
      if (text) inNs(host, ['nft', '-f', '-'], text);
      const out = JSON.parse(inNs(host, [process.execPath, '-e', CLIENT]).toString()) as { done: number; failed: number };
      if (out.failed > 0) throw new Error(`${name}: ${out.failed} connections failed`);
      results.get(name)!.push(out.done / seconds);
    }
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const base = results.get('(a) no table')!;
  console.log(`New TCP connections per second, host → internet namespace, 16 concurrent, ${seconds} s × ${rounds} rounds; target (b) ≥ 0.95 × (a), (b') against (a')`);
  console.log('"× (a)" is the median of the per-round ratios, which cancels drift between rounds.\n');
  const stateful = results.get("(a') no egressd table, conntrack on")!;
  console.log("| configuration | connections/s (median) | min–max | × (a) | × (a') |");
  console.log('|---|---|---|---|---|');
  for (const [name, samples] of results) {
    const ratio = (to: number[]) => median(samples.map((x, i) => x / to[i]!)).toFixed(3);
    console.log(`| ${name} | ${median(samples).toFixed(0)} | ${Math.min(...samples).toFixed(0)}–${Math.max(...samples).toFixed(0)} | ${ratio(base)} | ${ratio(stateful)} |`);
  }
  if (pairedSeconds > 0) {
    const name = "(b) egressd, no default deny (conntrack off): 100,000 CIDRs + 200 apps";
    const { ratios, failed } = await pairedRatios(host, tables[name]!);
    if (ratios.length === 0) throw new Error(`--paired ${pairedSeconds}: too short to compare a phase with the table against phases on both sides; give 10 or more`);
    const sorted = [...ratios].sort((x, y) => x - y);
    const quartile = (q: number) => sorted[Math.floor(q * (sorted.length - 1))]!.toFixed(3);
    console.log(`\nPaired, ${pairedSeconds} s in one run: the table switched dormant (no hooks: as (a)) and back every ${PHASE_MS} ms, each phase with it against the mean of its neighbours without`);
    console.log('\n| configuration | phases | × (a), median | quartiles | failed connections |');
    console.log('|---|---|---|---|---|');
    console.log(`| ${name} | ${ratios.length} | ${median(ratios).toFixed(3)} | ${quartile(0.25)}–${quartile(0.75)} | ${failed} |`);
  }
} finally {
  server.kill();
  spawnSync('ip', ['netns', 'del', host]);
  spawnSync('ip', ['netns', 'del', inet]);
  rmSync(dir, { recursive: true, force: true });
}
