/**
 * `egressctl` as a new user meets it: fresh processes, start to exit, for a
 * policy directory with a 100,000-address list file and 200 apps (issue 16,
 * item 11), side by side in one run:
 *   - `nft -f` of the same ruleset text (the last-good.nft egressctl apply
 *     kept), loaded into an empty namespace: the baseline;
 *   - `egressctl apply DIR`: the first apply into an empty namespace, and a
 *     re-apply of the same policy over it;
 *   - `egressctl compile DIR` (load, validate, compile, print the text);
 *   - `node -e 0`: what Node's own start-up costs, for reference.
 * Rounds alternate their order (A B B A …), so that a slow spell of this
 * shared machine falls on every row alike. Beside the wall time, each row
 * gives the CPU time its processes used (user + system, from the children
 * times in /proc/self/stat, 10 ms ticks): a busy machine stretches the wall
 * time of a CPU-bound row more than that of one waiting on the kernel.
 * Target: `egressctl apply` (first apply) ≤ 1.5 × `nft -f`.
 *
 * The CLI is the built one (dist/, rebuilt first); its state goes to a
 * temporary EGRESSD_STATE_DIR, never /var/lib/egressd. `--base TREE` adds
 * the same egressctl rows for another built checkout (an earlier commit),
 * interleaved with these: a before/after pair from one run.
 *
 *   npx tsx bench/cli-apply.ts [--runs 7] [--base /tmp/egressd-main]   (as root; it builds and removes its own namespace)
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { runInOwnNamespace } from './lib/netns.js';
import { median } from './lib/stats.js';

const { values } = parseArgs({ options: { inner: { type: 'string' }, runs: { type: 'string', default: '7' }, base: { type: 'string' } } });
const runs = Number(values.runs);
const ADDRESSES = 100_000;
const APPS = 200;
const ROOT = join(import.meta.dirname, '..');
const CLI = join(ROOT, 'dist/cli/main.js');

/**
 * An IP blocklist as people download them: one address per line, a comment
 * on top. The IPv4 documentation ranges give 768 addresses; the rest are
 * IPv6 addresses in 2001:db8::/32.
 */
function writePolicy(dir: string): void {
  mkdirSync(dir, { recursive: true });
  const v4 = ['192.0.2', '198.51.100', '203.0.113'].flatMap((net) => Array.from({ length: 256 }, (_, i) => `${net}.${i}`));
  const v6 = Array.from({ length: ADDRESSES - v4.length }, (_, i) => `2001:db8:${(i >> 12).toString(16)}::${(i & 0xfff).toString(16)}`);
  writeFileSync(join(dir, 'blocked.txt'), `# generated for bench/cli-apply.ts\n${[...v4, ...v6].join('\n')}\n`);
  const apps = Array.from(
    { length: APPS },
    (_, i) =>
      `  app${i}:\n    identity: {user: ${30000 + i}}\n    default: deny\n    rules:\n      - allow: [198.51.100.${i % 250}, "app${i}.example.org"]\n        ports: [443]`,
  );
  writeFileSync(
    join(dir, '00-blocklist.yaml'),
    `defaults: {egress: allow}\nlists:\n  blocked: {file: blocked.txt}\ndeny:\n  - to: ["@blocked"]\napps:\n${apps.join('\n')}\n`,
  );
}

const TICK_MS = 1000 / Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim());

/** CPU time, in ms, of the children this process has waited for (cutime + cstime). */
function childrenCpuMs(): number {
  const stat = readFileSync('/proc/self/stat', 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // Fields 16 and 17 of proc(5); the slice starts at field 3.
  return (Number(fields[13]) + Number(fields[14])) * TICK_MS;
}

function inner(root: string, base: string | undefined): void {
  const policy = join(root, 'policy');
  const state = join(root, 'state');
  const env = { ...process.env, EGRESSD_STATE_DIR: state };
  const run = (file: string, args: string[]) => {
    const result = spawnSync(file, args, { env, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
    if (result.status !== 0) throw new Error(`${file} ${args.join(' ')} exited ${result.status}: ${result.stderr}`);
  };
  const emptyNamespace = () => {
    spawnSync('nft', ['delete', 'table', 'inet', 'egressd'], { stdio: 'ignore' });
    rmSync(state, { recursive: true, force: true });
  };
  // The text nft -f loads is what egressctl apply keeps as last-good.nft.
  emptyNamespace();
  run(process.execPath, [CLI, 'apply', policy]);
  const textFile = join(root, 'last-good.nft');
  writeFileSync(textFile, readFileSync(join(state, 'last-good.nft')));

  type Row = { name: string; work: () => void; before?: () => void; samples: number[]; cpu: number[] };
  const cliRows = (cli: string, label: string): Row[] => [
    {
      name: `egressctl apply${label}: first apply (empty namespace)`,
      before: emptyNamespace,
      work: () => run(process.execPath, [cli, 'apply', policy]),
      samples: [],
      cpu: [],
    },
    // Over the first apply just before: the same policy again.
    { name: `egressctl apply${label}: re-apply, same policy`, work: () => run(process.execPath, [cli, 'apply', policy]), samples: [], cpu: [] },
    { name: `egressctl compile${label}`, work: () => run(process.execPath, [cli, 'compile', policy]), samples: [], cpu: [] },
  ];
  const rows: Row[] = [
    { name: 'nft -f last-good.nft (empty namespace)', before: emptyNamespace, work: () => run('nft', ['-f', textFile]), samples: [], cpu: [] },
    ...cliRows(CLI, ''),
    { name: 'node -e 0 (start-up alone)', work: () => run(process.execPath, ['-e', '0']), samples: [], cpu: [] },
    ...(base ? cliRows(join(base, 'dist/cli/main.js'), ` (base: ${base})`) : []),
  ];
  // Rows 1-2 and 5-6 are first apply + re-apply pairs, which stay in that order.
  const forward = base ? [0, 1, 2, 3, 4, 5, 6, 7] : [0, 1, 2, 3, 4];
  const backward = base ? [7, 5, 6, 4, 3, 1, 2, 0] : [4, 3, 1, 2, 0];
  for (let i = 0; i < runs; i++) {
    // A B B A: every other round runs the rows in reverse.
    const order = i % 2 === 0 ? forward : backward;
    for (const index of order) {
      const row = rows[index]!;
      row.before?.();
      const cpu = childrenCpuMs();
      const t = performance.now();
      row.work();
      row.samples.push(performance.now() - t);
      row.cpu.push(childrenCpuMs() - cpu);
    }
  }
  emptyNamespace();

  const nftF = median(rows[0]!.samples);
  const nftCpu = median(rows[0]!.cpu);
  const size = statSync(textFile).size;
  console.log(
    `Fresh processes, ${ADDRESSES.toLocaleString('en')}-address list + ${APPS} apps (${size.toLocaleString('en')} bytes of nft text), median of ${runs}, rounds interleaved; target: egressctl apply ≤ 1.5 × nft -f\n`,
  );
  console.log('| scenario | wall ms, median | min–max | × nft -f | CPU ms, median | min–max | × nft -f |');
  console.log('|---|---|---|---|---|---|---|');
  const range = (xs: number[]) => `${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}`;
  for (const row of rows) {
    const m = median(row.samples);
    const c = median(row.cpu);
    console.log(
      `| ${row.name} | ${m.toFixed(0)} | ${range(row.samples)} | ${(m / nftF).toFixed(2)} | ${c.toFixed(0)} | ${range(row.cpu)} | ${(c / nftCpu).toFixed(2)} |`,
    );
  }
}

if (values.inner) {
  inner(values.inner, values.base);
} else {
  if (process.getuid?.() !== 0) {
    console.error('bench/cli-apply.ts needs root (it creates a network namespace)');
    process.exit(2);
  }
  // The CLI is timed as built: build it from the sources in this tree first.
  execFileSync('npm', ['run', '--silent', 'build'], { cwd: ROOT, stdio: 'inherit' });
  const root = mkdtempSync(join(tmpdir(), 'egd-cli-bench-'));
  writePolicy(join(root, 'policy'));
  process.exitCode = runInOwnNamespace('egd-cli-bench', fileURLToPath(import.meta.url), root, [
    '--inner',
    root,
    '--runs',
    String(runs),
    ...(values.base ? ['--base', values.base] : []),
  ]);
}
