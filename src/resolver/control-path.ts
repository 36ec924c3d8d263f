import { join } from 'node:path';
import { LOCK_DIR, ownNetnsInode } from '../enforce/lock.js';

/**
 * Where the resolver's control socket (control.ts) is, apart from the socket
 * code: every egressctl command names it, and loading control.ts would load
 * the resolver's address memory and dns-packet into commands that never
 * connect (a fresh `egressctl apply` pays for every module it loads).
 */

/** The control socket of the resolver of the network namespace with this inode: one resolver per table, like the enforcement lock (lock.ts). */
export function controlSocketPathFor(netnsInode: number | 'unknown'): string {
  return join(LOCK_DIR, `net-${netnsInode}.resolver.sock`);
}

/** The control socket of this process's network namespace, so that resolvers in other namespaces (containers, the tests) never meet. */
export function controlSocketPath(): string {
  return controlSocketPathFor(ownNetnsInode());
}
