import { execFileSync, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { rmSync, statSync } from 'node:fs';
import { lockPathFor } from '../../src/enforce/lock.js';

/**
 * Runs `script` again (under tsx) inside a network namespace of its own,
 * with `args`, and removes the namespace, the enforcement lock file the
 * applies inside leave behind, and `root` afterwards — also when the run
 * fails. Returns the inner run's exit status. With `timeoutMs` the inner run
 * is sent SIGTERM when that time is up; any process still in the namespace
 * afterwards (a server the inner run started and could not stop) is killed,
 * since deleting a namespace's name does not end what runs in it.
 */
export function runInOwnNamespace(prefix: string, script: string, root: string, args: readonly string[], options: { timeoutMs?: number } = {}): number {
  const ns = `${prefix}-${randomBytes(3).toString('hex')}`;
  execFileSync('ip', ['netns', 'add', ns]);
  const lock = lockPathFor(statSync(`/run/netns/${ns}`).ino);
  try {
    const result = spawnSync('nsenter', [`--net=/run/netns/${ns}`, process.execPath, '--import', 'tsx', script, ...args], {
      stdio: 'inherit',
      timeout: options.timeoutMs,
      killSignal: 'SIGTERM',
    });
    if (result.error) console.error(`${script}: ${result.error.message}`);
    return result.status ?? 1;
  } finally {
    const left = spawnSync('ip', ['netns', 'pids', ns]).stdout.toString().trim().split(/\s+/).filter(Boolean);
    for (const pid of left) spawnSync('kill', ['-KILL', pid]);
    execFileSync('ip', ['netns', 'delete', ns]);
    rmSync(lock, { force: true });
    rmSync(root, { recursive: true, force: true });
  }
}
