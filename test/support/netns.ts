import { spawnSync } from 'node:child_process';
import { rmSync, statSync } from 'node:fs';
import { lockPathFor } from '../../src/enforce/lock.js';

/**
 * Deletes a network namespace a test made, and the enforcement lock file
 * (/run/egressd) that applies inside it left: each namespace has its own.
 */
export function deleteNamespace(ns: string): void {
  let lock: string | undefined;
  try {
    lock = lockPathFor(statSync(`/run/netns/${ns}`).ino);
  } catch {
    // No such namespace: nothing to remove.
  }
  spawnSync('ip', ['netns', 'del', ns]);
  if (lock) rmSync(lock, { force: true });
}
