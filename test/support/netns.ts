import { spawnSync } from 'node:child_process';
import { rmSync, statSync } from 'node:fs';
import { lockPathFor } from '../../src/enforce/lock.js';
import { controlSocketPathFor } from '../../src/resolver/control.js';

/**
 * Deletes a network namespace a test made, and the enforcement lock file
 * (/run/egressd) that applies inside it left: each namespace has its own.
 */
export function deleteNamespace(ns: string): void {
  let lock: string | undefined;
  let resolverSocket: string | undefined;
  try {
    const inode = statSync(`/run/netns/${ns}`).ino;
    lock = lockPathFor(inode);
    resolverSocket = controlSocketPathFor(inode);
  } catch {
    // No such namespace: nothing to remove.
  }
  // Removed while the namespace still holds its inode number (src/lab/sys.ts, deleteNetns): the next namespace made gets it.
  if (lock) rmSync(lock, { force: true });
  // Left by a resolver killed in it.
  if (resolverSocket) rmSync(resolverSocket, { force: true });
  spawnSync('ip', ['netns', 'del', ns]);
}
