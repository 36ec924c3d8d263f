import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface NftCheckResult {
  readonly ok: boolean;
  readonly stderr: string;
}

export function nftAvailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (network namespaces)';
  const probe = spawnSync('nft', ['--version'], { encoding: 'utf8' });
  if (probe.status !== 0) return 'the nft binary is not installed (scripts/setup.sh installs it)';
  return undefined;
}

/**
 * Runs the real `nft -c` (check only: parsed and evaluated against the
 * kernel, nothing committed) in a throwaway network namespace. cgroup paths
 * named in the ruleset are created first inside a private cgroup namespace
 * and mount namespace, because nft resolves them to cgroup ids while
 * checking; the machine's own cgroup tree and ruleset are never touched.
 */
export function nftCheck(ruleset: string, options: { json?: boolean; cgroups?: readonly string[] } = {}): NftCheckResult {
  const id = randomBytes(4).toString('hex');
  const netns = `egd-chk-${id}`;
  const dir = mkdtempSync(join(tmpdir(), 'egd-chk-'));
  const file = join(dir, options.json ? 'ruleset.json' : 'ruleset.nft');
  writeFileSync(file, ruleset);
  const paths = [...(options.cgroups ?? [])];
  const quoted = (p: string) => `'${p.replace(/'/g, `'\\''`)}'`;
  const inner = [
    'set -e',
    // The outer cgroup2 mount is inherited; a fresh one shows this cgroup namespace's root.
    'umount -l /sys/fs/cgroup',
    'mount -t cgroup2 none /sys/fs/cgroup',
    ...paths.map((p) => `mkdir -p /sys/fs/cgroup/${quoted(p)}`),
    `set +e; nsenter --net=/run/netns/${netns} nft -c ${options.json ? '-j ' : ''}-f ${quoted(file)}; rc=$?`,
    ...[...paths]
      .sort((a, b) => b.split('/').length - a.split('/').length)
      .flatMap((p) => {
        const parts = p.split('/');
        return parts.map((_, i) => `rmdir /sys/fs/cgroup/${quoted(parts.slice(0, parts.length - i).join('/'))} 2>/dev/null`);
      }),
    'exit $rc',
  ].join('\n');
  const outer = [
    'set -e',
    'mount -t cgroup2 none /sys/fs/cgroup',
    `mkdir /sys/fs/cgroup/egd-chk-${id}`,
    `echo $$ > /sys/fs/cgroup/egd-chk-${id}/cgroup.procs`,
    'set +e',
    `unshare --cgroup --mount sh -c ${quoted(inner)}`,
    'rc=$?',
    'echo $$ > /sys/fs/cgroup/cgroup.procs',
    `rmdir /sys/fs/cgroup/egd-chk-${id}`,
    'exit $rc',
  ].join('\n');
  execFileSync('ip', ['netns', 'add', netns]);
  try {
    const run = spawnSync('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', outer], { encoding: 'utf8', timeout: 60_000 });
    return { ok: run.status === 0, stderr: `${run.stderr}${run.error ? String(run.error) : ''}` };
  } finally {
    spawnSync('ip', ['netns', 'del', netns]);
    rmSync(dir, { recursive: true, force: true });
  }
}
