/**
 * Applying a large policy — 100,000 CIDRs in the global deny list and 200
 * apps — side by side, each row starting from the table the row before left:
 *   - `nft -f` of the same ruleset as text (a fresh nft process, one
 *     transaction replacing the table): the baseline;
 *   - egressd's apply in-process (libnftables, a fresh context per
 *     transaction; src/enforce/enforcer.ts), in the cases an apply meets:
 *     the first apply into an empty namespace; over a table it did not leave
 *     (it reads the table whole); over its own last apply with the 100,000
 *     CIDRs replaced by others (every element is new); over its own last
 *     apply with one app changed (the CIDR set is kept, src/enforce/swap.ts);
 *   - the same with the fallback backend (spawning nft per transaction);
 *   - the whole `egressctl apply` (Node start-up, load, compile, apply).
 * Target: egressd in-process ≤ 1.3 × `nft -f`.
 *
 *   npx tsx bench/apply.ts [--runs 5]   (as root; it builds and removes its own namespace)
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { compile } from '../src/compile/compile.js';
import { renderText } from '../src/compile/ruleset.js';
import { applyLoadedPolicy, type EnforcerDeps } from '../src/enforce/enforcer.js';
import type { Nft } from '../src/nft/client.js';
import { openNft } from '../src/nft/open.js';
import { loadPolicyOrThrow } from '../src/policy/load.js';
import type { Policy } from '../src/policy/model.js';
import { runInOwnNamespace } from './lib/netns.js';
import { median } from './lib/stats.js';

const { values } = parseArgs({ options: { inner: { type: 'string' }, runs: { type: 'string', default: '5' } } });
const runs = Number(values.runs);
const CIDRS = 100_000;
const APPS = 200;
const ROOT = join(import.meta.dirname, '..');

/** Policy "a" or "b" (other CIDRs), or "a2" (policy a with one app's rule changed). */
function writePolicy(dir: string, variant: 'a' | 'b' | 'a2'): void {
  mkdirSync(dir, { recursive: true });
  const first = variant === 'b' ? 0x100 : 0;
  const cidrs = Array.from({ length: CIDRS }, (_, i) => `2001:db8:${(first + (i >> 12)).toString(16)}:${(i & 0xfff).toString(16)}::/64`);
  writeFileSync(join(dir, 'cidrs.txt'), `${cidrs.join('\n')}\n`);
  const port = (i: number) => (variant === 'a2' && i === 7 ? 8443 : 443);
  const apps = Array.from(
    { length: APPS },
    (_, i) =>
      `  app${i}:\n    identity: {user: ${30000 + i}}\n    default: deny\n    rules:\n      - allow: [198.51.100.${i % 250}, "app${i}.example.org"]\n        ports: [${port(i)}]`,
  );
  writeFileSync(join(dir, '00.yaml'), `defaults: {egress: allow}\nlists:\n  cidrs: {file: cidrs.txt}\ndeny:\n  - to: ["@cidrs"]\napps:\n${apps.join('\n')}\n`);
}

async function inner(root: string): Promise<void> {
  const policies: Record<'a' | 'b' | 'a2', Policy> = {
    a: loadPolicyOrThrow(join(root, 'a')).policy,
    b: loadPolicyOrThrow(join(root, 'b')).policy,
    a2: loadPolicyOrThrow(join(root, 'a2')).policy,
  };
  const text = renderText(compile(policies.a, { users: new Map(), groups: new Map(), cgroups: [] }).ruleset);
  const textFile = join(root, 'ruleset.nft');
  // nft -f gets a one-transaction replace of the same table.
  writeFileSync(textFile, `add table inet egressd; delete table inet egressd;\n${text}`);
  const lib = await openNft({ prefer: 'libnftables', strict: true });
  const bin = await openNft({ prefer: 'binary', strict: true });
  const depsWith = (nft: Nft, state: string): EnforcerDeps => ({
    nft,
    facts: () => ({ users: new Map(), groups: new Map(), cgroups: [] }),
    stateDir: join(root, state),
    audit: () => {},
  });
  const inProcess = depsWith(lib, 'state-inproc');
  const fallback = depsWith(bin, 'state-bin');
  const apply = async (deps: EnforcerDeps, which: keyof typeof policies, expected: string) => {
    const applied = await applyLoadedPolicy(policies[which], deps, { source: which });
    if (applied.liveFrom !== expected) throw new Error(`apply read the live table from ${applied.liveFrom}, expected ${expected}`);
  };
  const cli = (which: string) =>
    execFileSync(process.execPath, ['--import', 'tsx', join(ROOT, 'src/cli/main.ts'), 'apply', join(root, which)], {
      stdio: 'ignore',
      env: { ...process.env, EGRESSD_STATE_DIR: join(root, 'state-cli') },
    });

  const rows: [string, number[]][] = [
    ['nft -f (same text, fresh process, one transaction)', []],
    ['egressd in-process: first apply, empty namespace', []],
    ['egressd in-process: over a table it did not leave (reads it whole)', []],
    ['egressd in-process: over its last apply, all 100,000 CIDRs replaced', []],
    ['egressd in-process: over its last apply, one app changed (CIDR set kept)', []],
    ['egressd fallback backend: over its last apply, all CIDRs replaced', []],
    ['egressctl apply (start-up + load + compile + apply), all CIDRs replaced', []],
  ];
  const timed = async (row: number, work: () => unknown) => {
    const t = performance.now();
    await work();
    rows[row]![1].push(performance.now() - t);
  };
  for (let i = 0; i < runs; i++) {
    await lib.deleteTable();
    rmSync(inProcess.stateDir, { recursive: true, force: true });
    await timed(1, () => apply(inProcess, 'a', 'none'));
    await timed(0, () => execFileSync('nft', ['-f', textFile]));
    await timed(2, () => apply(inProcess, 'a', 'listing'));
    await timed(3, () => apply(inProcess, 'b', 'record'));
    await apply(inProcess, 'a', 'record');
    await timed(4, () => apply(inProcess, 'a2', 'record'));
    await apply(fallback, 'b', 'listing');
    await timed(5, () => apply(fallback, 'a', 'record'));
    cli('b');
    await timed(6, () => cli('a'));
  }
  const raw = median(rows[0]![1]);
  console.log(
    `Apply ${CIDRS.toLocaleString('en')} CIDRs + ${APPS} apps (${text.length.toLocaleString('en')} bytes of nft text), median of ${runs}; target: in-process ≤ 1.3 × nft -f\n`,
  );
  console.log('| scenario | median ms | × nft -f |');
  console.log('|---|---|---|');
  for (const [name, samples] of rows) console.log(`| ${name} | ${median(samples).toFixed(0)} | ${(median(samples) / raw).toFixed(2)} |`);
  await lib.deleteTable();
}

if (values.inner) {
  await inner(values.inner);
} else {
  if (process.getuid?.() !== 0) {
    console.error('bench/apply.ts needs root (it creates a network namespace)');
    process.exit(2);
  }
  const root = mkdtempSync(join(tmpdir(), 'egd-apply-bench-'));
  for (const variant of ['a', 'b', 'a2'] as const) writePolicy(join(root, variant), variant);
  process.exitCode = runInOwnNamespace('egd-apply-bench', fileURLToPath(import.meta.url), root, ['--inner', root, '--runs', String(runs)]);
}
