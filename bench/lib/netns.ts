import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rmSync, statSync } from 'node:fs';
import { lockPathFor } from '../../src/enforce/lock.js';

/**
 * Runs `script` again (under tsx) inside a network namespace of its own,
 * with `args`, and removes the namespace, the enforcement lock file the
 * applies inside leave behind, and `root` afterwards — also when the run
 * fails. Returns the inner run's exit status.
 */
export function runInOwnNamespace(prefix: string, script: string, root: string, args: readonly string[]): number {
  const ns = `${prefix}-${randomBytes(3).toString('hex')}`;
  execFileSync('ip', ['netns', 'add', ns]);
  const lock = lockPathFor(statSync(`/run/netns/${ns}`).ino);
  try {
    const result = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', script, ...args], { stdio: 'inherit' });
    return result.status ?? 1;
  } finally {
    execFileSync('ip', ['netns', 'delete', ns]);
    rmSync(lock, { force: true });
    rmSync(root, { recursive: true, force: true });
  }
}
