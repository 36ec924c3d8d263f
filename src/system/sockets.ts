/**
 * The TCP sockets of this network namespace as apply's sweep (enforce/sweep.ts)
 * needs them: from sock_diag, with what the kernel's `meta skgid` would see
 * for a live one, the groups of an orphan's user, and the addresses that
 * leave through lo.
 */
import { readdirSync, readlinkSync, statSync } from 'node:fs';
import { networkInterfaces } from 'node:os';
import type { SocketAccess } from '../enforce/sweep.js';
import { nssAccounts, type Accounts } from './nss.js';
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

/**
 * A uid's groups through NSS, primary and supplementary, as login would give
 * them: its passwd entry by uid, then every group listing its name. Looked
 * up by uid, never as a name (`id -G 1000` asks for a user named "1000"
 * first). A uid with no passwd entry (a subordinate uid) has none.
 */
export function groupsOfUser(uid: number, accounts: Pick<Accounts, 'user' | 'groupsOf'>): readonly number[] | { error: string } {
  const user = accounts.user(uid);
  if (user === undefined) return [];
  if ('error' in user) return { error: `uid ${uid}: ${user.error}` };
  const groups = accounts.groupsOf(user.name, user.gid);
  return 'error' in groups ? { error: `uid ${uid}: ${groups.error}` } : groups;
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
  // Bound on first use: only an orphan of a policy naming groups asks.
  let accounts: Accounts | undefined;
  return {
    tcpSockets: (states) => diag.tcpSockets(states),
    destroy: (socket) => diag.destroy(socket),
    socketGroups: (inodes) => socketGroups(inodes),
    groupsOfUser: (uid) => groupsOfUser(uid, (accounts ??= nssAccounts())),
    localAddresses,
    close: () => diag.close(),
  };
}
