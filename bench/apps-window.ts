/**
 * The app tracker's window: from a cgroup's creation (mkdir returned) to
 * its id in the identity map (the kernel acknowledged the element), over N
 * cgroups made one at a time under a watched parent. Until then the
 * table's default applies to the cgroup's packets. Target: p99 ≤ 50 ms.
 *
 * The tracker runs as egressd runs it (the part, a real table applied by
 * the enforcer, cgroup2 at /sys/fs/cgroup) in a test net's host namespaces
 * (test/apps/fixtures/tracker.ts). Scenarios:
 *   - made by the tracker's own process (no clock between two processes);
 *   - made by another process (this one), timed against the fixture's stamp;
 *   - the same with 2,000 cgroups no selector matches beside them.
 *
 * npx tsx bench/apps-window.ts [--quick]   (root: it builds a network namespace)
 */
import { mkdirSync, mkdtempSync, rmdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createTestNet } from '../test/harness/index.js';
import { startTracker, wallNow } from '../test/apps/support.js';
import { latencyTable, type LatencyRow } from './lib/stats.js';

const quick = process.argv.includes('--quick');
const N = quick ? 200 : 2000;
const net = await createTestNet();
const E = `egdapps-bench-${net.id}`;
const state = mkdtempSync(join(tmpdir(), 'egd-apps-bench-'));
const policy = mkdtempSync(join(tmpdir(), 'egd-apps-bench-policy-'));
const root = net.host.cgroupFsPath('');
const rows: LatencyRow[] = [];
try {
  net.host.mkCgroup(`${E}/own`);
  net.host.mkCgroup(`${E}/other`);
  const { writeFileSync } = await import('node:fs');
  writeFileSync(
    join(policy, '00.yaml'),
    `defaults: {egress: deny}\napps:\n  bench: {identity: {cgroup: "${E}/*/bench-*"}, rules: [{allow: [198.51.100.1], ports: [8443], proto: tcp}]}\n`,
  );
  const tracker = await startTracker(net, { policy, state, reconcileMs: 600_000 });

  const own = async (scenario: string): Promise<void> => {
    const from = tracker.events.length;
    tracker.send({ cmd: 'bench', parent: `${E}/own`, count: N });
    const done = await tracker.waitFor((e) => e.ev === 'bench', 120_000, from);
    rows.push({ scenario, samples: done['windows'] as number[] });
  };
  const other = async (scenario: string): Promise<void> => {
    const samples: number[] = [];
    for (let i = 0; i < N; i++) {
      const path = `${E}/other/bench-${i}`;
      const from = tracker.events.length;
      mkdirSync(`${root}/${path}`);
      const made = wallNow();
      const change = await tracker.waitFor((e) => e.ev === 'change' && e.added === true && e.path === path, 5000, from);
      samples.push(change.at! - made);
      rmdirSync(`${root}/${path}`);
    }
    rows.push({ scenario, samples });
  };

  await own('made by the tracker process');
  await other('made by another process');
  const noise = Array.from({ length: 2000 }, (_, i) => `${root}/${E}/other/noise-${i}`);
  for (const dir of noise) mkdirSync(dir);
  try {
    await other('another process, 2,000 other cgroups beside');
  } finally {
    for (const dir of noise) rmdirSync(dir);
  }
  await tracker.stop();
} finally {
  await net.destroy();
  rmSync(state, { recursive: true, force: true });
  rmSync(policy, { recursive: true, force: true });
}
console.log(`\napps-window.ts — cgroup made → id in its map (${quick ? 'quick' : 'full'}, N=${N} each)\n`);
console.log(latencyTable(rows));
