/**
 * The TCP sockets of this network namespace as apply's sweep (enforce/sweep.ts)
 * needs them: from sock_diag, with what the kernel's `meta skgid` would see
 * for a live one, the groups of an orphan's user, and the addresses that
 * leave through lo.
 */
import { spawnSync } from 'node:child_process';
import { readdirSync, readlinkSync, statSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import type { SocketAccess } from '../enforce/sweep.js';
import { openSockDiag } from './sock-diag.js';

/**
 * The group of each live socket in `inodes`: the socket inode's group is the
 * fsgid of the process that made (or accepted) it, which is what `meta
 * skgid` reads (the file's credentials, taken at the same moment). Found
 * through /proc/PID/fd; a socket no process holds is missing from the answer.
 */
export function socketGroups(inodes: ReadonlySet<number>, proc = '/proc'): Map<number, number> {
  const found = new Map<number, number>();
  if (inodes.size === 0) return found;
  for (const pid of readdirSync(proc)) {
    if (!/^\d+$/.test(pid)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`${proc}/${pid}/fd`);
    } catch {
      continue; // gone, or a kernel thread
    }
    for (const fd of fds) {
      const path = `${proc}/${pid}/fd/${fd}`;
      try {
        const inode = /^socket:\[(\d+)\]$/.exec(readlinkSync(path))?.[1];
        if (inode === undefined || !inodes.has(Number(inode)) || found.has(Number(inode))) continue;
        found.set(Number(inode), statSync(path).gid);
      } catch {
        continue; // closed meanwhile
      }
    }
    if (found.size === inodes.size) break;
  }
  return found;
}

/** A user's groups through NSS, primary and supplementary (`id -G`), or why they could not be looked up. */
export function groupsOfUser(uid: number): readonly number[] | { error: string } {
  const run = spawnSync('id', ['-G', '--', String(uid)], { encoding: 'utf8', timeout: 10_000 });
  if (run.error) return { error: `id -G ${uid}: ${run.error.message}` };
  if (run.status !== 0) return { error: `id -G ${uid}: ${run.stderr.trim() || `exit ${run.status}`}` };
  const gids = run.stdout.trim().split(/\s+/).map(Number);
  return gids.every(Number.isInteger) ? gids : { error: `id -G ${uid}: unexpected answer "${run.stdout.trim()}"` };
}

/** The addresses of this network namespace's interfaces: a connection to one leaves through lo. */
export function localAddresses(): Set<string> {
  return new Set(
    Object.values(networkInterfaces())
      .flat()
      .filter((a) => a !== undefined)
      .map((a) => a.address.replace(/%.*$/, '')),
  );
}

/** The system's sockets, through sock_diag in the calling process's network namespace. */
export function openSocketAccess(): SocketAccess {
  const diag = openSockDiag();
  return {
    tcpSockets: (states) => diag.tcpSockets(states),
    destroy: (socket) => diag.destroy(socket),
    socketGroups: (inodes) => socketGroups(inodes),
    groupsOfUser,
    localAddresses,
    close: () => diag.close(),
  };
}
