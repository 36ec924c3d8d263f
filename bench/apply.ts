/**
 * Applying a large policy — 100,000 CIDRs in the global deny list and 200
 * apps — side by side:
 *   - egressd's apply in-process (libnftables, fresh context per transaction:
 *     read the live table, prepare + switch + clean-up, see src/enforce/swap.ts),
 *     once over a table it did not leave (read whole), once over its own
 *     last apply (known from the state directory's record, src/enforce/record.ts),
 *   - the same ruleset text loaded by `nft -f` (a fresh nft process),
 *   - egressd's apply through the fallback backend (spawning nft per transaction),
 *   - the whole `egressctl apply` (Node start-up, load, compile, transaction).
 * Target: egressd in-process ≤ 1.3 × `nft -f` (a one-transaction replace).
 *
 *   npx tsx bench/apply.ts [--runs 5]   (as root; it builds and removes its own namespace)
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { compile } from '../src/compile/compile.js';
import { renderText } from '../src/compile/nft.js';
import { applyLoadedPolicy, type EnforcerDeps } from '../src/enforce/enforcer.js';
import { openNft } from '../src/nft/open.js';
import { loadPolicyOrThrow } from '../src/policy/load.js';

const { values } = parseArgs({ options: { inner: { type: 'string' }, runs: { type: 'string', default: '5' } } });
const runs = Number(values.runs);
const CIDRS = 100_000;
const APPS = 200;
const ROOT = join(import.meta.dirname, '..');

function writePolicy(dir: string): void {
  const cidrs = Array.from({ length: CIDRS }, (_, i) => `2001:db8:${(i >> 12).toString(16)}:${(i & 0xfff).toString(16)}::/64`);
  writeFileSync(join(dir, 'cidrs.txt'), `${cidrs.join('\n')}\n`);
  const apps = Array.from({ length: APPS }, (_, i) => `  app${i}:\n    identity: {user: ${30000 + i}}\n    default: deny\n    rules:\n      - allow: [198.51.100.${i % 250}, "app${i}.example.org"]\n        ports: [443]`);
  writeFileSync(join(dir, '00.yaml'), `defaults: {egress: allow}\nlists:\n  cidrs: {file: cidrs.txt}\ndeny:\n  - to: ["@cidrs"]\napps:\n${apps.join('\n')}\n`);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function inner(dir: string): Promise<void> {
  const { policy } = loadPolicyOrThrow(dir);
  const ruleset = compile(policy, { users: new Map(), groups: new Map(), cgroups: [] }).ruleset;
  const text = renderText(ruleset);
  const textFile = join(dir, 'ruleset.nft');
  // nft -f gets the same one-transaction replace egressd sends.
  writeFileSync(textFile, `add table inet egressd; delete table inet egressd;\n${text}`);
  const lib = await openNft({ prefer: 'libnftables', strict: true });
  const bin = await openNft({ prefer: 'binary', strict: true });
  const depsWith = (nft: typeof lib, state: string): EnforcerDeps => ({ nft, facts: () => ({ users: new Map(), groups: new Map(), cgroups: [] }), stateDir: join(dir, state), audit: () => {} });
  const inProcess = depsWith(lib, 'state-inproc');
  const fallback = depsWith(bin, 'state-bin');
  const cli = () =>
    execFileSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), 'apply', dir], { stdio: 'ignore', env: { ...process.env, EGRESSD_STATE_DIR: join(dir, 'state-cli') } });
  const rows: [string, number[]][] = [
    ['nft -f (same text, fresh process)', []],
    ['egressd apply in-process, over a table it did not leave (reads it whole)', []],
    ['egressd apply in-process, over the table its last apply left', []],
    ['egressd apply with the fallback backend (spawning nft), over its last apply', []],
    ['egressctl apply (start-up + load + compile + swap), over its last apply', []],
  ];
  const timed = async (row: number, work: () => unknown) => {
    const t = performance.now();
    await work();
    rows[row]![1].push(performance.now() - t);
  };
  const liveFrom = async (deps: EnforcerDeps, expected: string) => {
    const applied = await applyLoadedPolicy(policy, deps, { source: dir });
    if (applied.liveFrom !== expected) throw new Error(`apply read the live table from ${applied.liveFrom}, expected ${expected}`);
  };
  for (let i = 0; i < runs; i++) {
    // Each row starts from the table the row before left.
    await timed(0, () => execFileSync('nft', ['-f', textFile]));
    await timed(1, () => liveFrom(inProcess, 'listing'));
    await timed(2, () => liveFrom(inProcess, 'record'));
    await liveFrom(fallback, 'listing');
    await timed(3, () => liveFrom(fallback, 'record'));
    cli();
    await timed(4, cli);
  }
  const raw = median(rows[0]![1]);
  console.log(`Apply ${CIDRS.toLocaleString('en')} CIDRs + ${APPS} apps (${text.length.toLocaleString('en')} bytes of nft text), median of ${runs}; target: in-process ≤ 1.3 × nft -f\n`);
  console.log('| scenario | median ms | × nft -f |');
  console.log('|---|---|---|');
  for (const [name, samples] of rows) console.log(`| ${name} | ${median(samples).toFixed(0)} | ${(median(samples) / raw).toFixed(2)} |`);
  await lib.deleteTable('inet', 'egressd');
}

if (values.inner) {
  await inner(values.inner);
} else {
  if (process.getuid?.() !== 0) {
    console.error('bench/apply.ts needs root (it creates a network namespace)');
    process.exit(2);
  }
  const ns = `egd-apply-bench-${randomBytes(3).toString('hex')}`;
  const dir = mkdtempSync(join(tmpdir(), 'egd-apply-bench-'));
  writePolicy(dir);
  execFileSync('ip', ['netns', 'add', ns]);
  try {
    const result = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', fileURLToPath(import.meta.url), '--inner', dir, '--runs', String(runs)], { stdio: 'inherit' });
    process.exitCode = result.status ?? 1;
  } finally {
    execFileSync('ip', ['netns', 'delete', ns]);
    rmSync(dir, { recursive: true, force: true });
  }
}
