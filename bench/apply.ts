/**
 * Applying a large policy — 100,000 CIDRs in the global deny list and 200
 * apps — side by side:
 *   - egressd's generation swap in-process (libnftables, fresh context per
 *     transaction: prepare + switch + clean-up, see src/enforce/swap.ts),
 *   - the same ruleset text loaded by `nft -f` (a fresh nft process),
 *   - egressd's fallback backend (spawning nft),
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
import { removalText, swapTexts, withGeneration } from '../src/enforce/swap.js';
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
  const swaps = { a: swapTexts(withGeneration(ruleset, 'a')), b: swapTexts(withGeneration(ruleset, 'b')) };
  const textFile = join(dir, 'ruleset.nft');
  // nft -f gets the same one-transaction replace egressd sends.
  writeFileSync(textFile, `add table inet egressd; delete table inet egressd;\n${text}`);
  const lib = await openNft({ prefer: 'libnftables', strict: true });
  const bin = await openNft({ prefer: 'binary', strict: true });
  const rows: [string, number[]][] = [
    ['egressd generation swap in-process (libnftables, 3 transactions)', []],
    ['nft -f (same text, fresh process)', []],
    ['egressd fallback (spawning nft)', []],
    ['egressctl apply (start-up + load + compile + transaction)', []],
  ];
  for (let i = 0; i < runs; i++) {
    let t = performance.now();
    // As egressctl apply does it, over the table the previous row left: the listing taken first
    // (for plan and lockdown) names the generation to remove last.
    const next = i % 2 === 0 ? 'b' : 'a';
    const before = await lib.listTable('inet', 'egressd');
    await lib.run({ text: swaps[next].prepare });
    await lib.run({ text: swaps[next].switch });
    const stale = before && removalText(before, (name) => !name.endsWith(`.${next}`));
    if (stale) await lib.run({ text: stale });
    rows[0]![1].push(performance.now() - t);
    t = performance.now();
    execFileSync('nft', ['-f', textFile]);
    rows[1]![1].push(performance.now() - t);
    t = performance.now();
    await bin.replaceTable('inet', 'egressd', text);
    rows[2]![1].push(performance.now() - t);
    t = performance.now();
    execFileSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), 'apply', dir], { stdio: 'ignore', env: { ...process.env, EGRESSD_STATE_DIR: join(dir, 'state') } });
    rows[3]![1].push(performance.now() - t);
  }
  const raw = median(rows[1]![1]);
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
