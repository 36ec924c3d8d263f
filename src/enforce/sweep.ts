/**
 * Apply's last step: cut the TCP connections whose packets the table just
 * applied drops by an explicit deny.
 *
 * The table drops them already while their program holds them; but a
 * program that writes and then closes leaves an orphan — a socket the
 * kernel goes on sending from, with no file, so `meta skuid` and `meta
 * skgid` match nothing and its packets fall to the default. (Identities by
 * cgroup hold: `socket cgroupv2` stays on the socket.) Destroying the socket
 * at apply discards what it queued. A connection opened after the apply
 * never gets there: its handshake is dropped while its program holds it.
 *
 * Which: every TCP socket but listeners, TIME_WAIT and CLOSE, orphans
 * included, whose packets `explain` — kept in agreement with the kernel —
 * says an explicit deny drops: a system domain, lockdown, Tor confinement,
 * an app's deny rule, the global deny list. A default deny keeps
 * established connections (README, "What it enforces"), so a socket that
 * meets only a default deny stays. The socket is asked about as its user
 * (sk_uid, kept after close) and as each group the policy names that it may
 * have: a live socket's own group (the socket inode's, which is what `meta
 * skgid` reads), an orphan's user's groups (its own gid is gone: every group
 * its user is a member of counts, which fails closed for members and
 * touches no one else). Its cgroup is not asked about: a socket whose
 * cgroup's identity denies it is dropped by the kernel, closed or not, and
 * cutting it as well is harmless. A connection one of the answers denies is
 * cut even where the kernel's dispatch would have let another identity of
 * the same socket decide (a user-identified app that allows what its
 * group's app denies): that errs towards cutting.
 */
import { isIPv4 } from 'node:net';
import type { Facts } from '../compile/compile.js';
import { explain, type ExplainFacts, type Explanation, type Who } from '../compile/explain.js';
import { EgressError, ErrorCode } from '../errors.js';
import type { Policy } from '../policy/model.js';
import { stateMask, stateName, TcpState, type TcpSocket } from '../system/sock-diag.js';

/** What the sweep needs of the system; src/system/sockets.ts gives the real one. */
export interface SocketAccess {
  tcpSockets(states: number): TcpSocket[];
  destroy(socket: TcpSocket): 'destroyed' | 'gone';
  /** The group of each live socket by inode (what `meta skgid` sees); sockets no process holds are left out. */
  socketGroups(inodes: ReadonlySet<number>): ReadonlyMap<number, number>;
  /** A uid's groups through NSS, primary and supplementary; none for a uid without a passwd entry (a subordinate uid). */
  groupsOfUser(uid: number): readonly number[] | { error: string };
  /** This namespace's own addresses: connections to them leave through lo. */
  localAddresses(): ReadonlySet<string>;
  close(): void;
}

/**
 * States whose socket may still send data: not LISTEN (it sends none of its
 * own), TIME_WAIT and CLOSE (nothing left to send), nor a request socket
 * (NEW_SYN_RECV: its handshake is judged as its listener's, which has a file).
 */
export const SWEPT_STATES = stateMask([
  TcpState.Established,
  TcpState.SynSent,
  TcpState.SynRecv,
  TcpState.FinWait1,
  TcpState.FinWait2,
  TcpState.CloseWait,
  TcpState.LastAck,
  TcpState.Closing,
]);

export interface CutConnection {
  /** "uid 1001 192.0.2.1:40000 -> 198.51.100.1:443 ESTABLISHED (orphan)". */
  readonly socket: string;
  readonly ruleId: string;
}

export interface SweepOutcome {
  /** Sockets looked at. */
  readonly examined: number;
  /** Destroyed: their queued data will not leave. */
  readonly cut: readonly CutConnection[];
  /** Gone before they could be destroyed (closed meanwhile). */
  readonly gone: number;
  /** Sockets that should have been cut and were not, with why. */
  readonly failed: readonly { readonly socket: string; readonly reason: string }[];
}

/** An explanation that cuts: a deny that is not a default. */
function explicitDeny(explanation: Explanation | { error: string }): explanation is Explanation {
  return !('error' in explanation) && explanation.verdict === 'deny' && explanation.level !== 'default';
}

/** The numeric gids of every group selector in the policy (apps, system domains, updaters). */
function policyGroups(policy: Policy, facts: Pick<Facts, 'groups'>): Set<number> {
  const identities = [...policy.apps.flatMap((app) => app.identities), ...policy.systemDomains.flatMap((d) => d.members), ...policy.tor.updaters];
  const gids = new Set<number>();
  for (const identity of identities) {
    for (const selector of identity.selectors) {
      if (selector.kind !== 'group') continue;
      const gid = typeof selector.group === 'number' ? selector.group : facts.groups.get(selector.group);
      if (typeof gid === 'number') gids.add(gid);
    }
  }
  return gids;
}

export function describeSocket(socket: TcpSocket): string {
  const endpoint = (e: TcpSocket['local']) => (e.address.includes(':') ? `[${e.address}]:${e.port}` : `${e.address}:${e.port}`);
  return `uid ${socket.uid} ${endpoint(socket.local)} -> ${endpoint(socket.remote)} ${stateName(socket.state)}${socket.inode === 0 ? ' (orphan)' : ''}`;
}

/** The sockets to cut, each with the explanation that denies it. Reads the system (groups, addresses) only as needed. */
export function socketsToCut(
  policy: Policy,
  facts: ExplainFacts,
  lockdown: boolean,
  sockets: readonly TcpSocket[],
  access: Pick<SocketAccess, 'socketGroups' | 'groupsOfUser' | 'localAddresses'>,
): { socket: TcpSocket; because: Explanation }[] {
  const named = policyGroups(policy, facts);
  const local = access.localAddresses();
  const live = named.size > 0 ? access.socketGroups(new Set(sockets.filter((s) => s.inode !== 0).map((s) => s.inode))) : new Map<number, number>();
  const userGroups = new Map<number, readonly number[]>();
  const groupsOf = (uid: number): readonly number[] => {
    let gids = userGroups.get(uid);
    if (!gids) {
      const found = access.groupsOfUser(uid);
      // Not known: any group the policy names may be its, so every one counts (fails closed).
      gids = 'error' in found ? [...named] : found.filter((gid) => named.has(gid));
      userGroups.set(uid, gids);
    }
    return gids;
  };
  const answers = new Map<string, Explanation | undefined>();
  const ask = (who: Who, host: string, port: number): Explanation | undefined => {
    const key = `${JSON.stringify(who)} ${host} ${port}`;
    if (!answers.has(key)) {
      const answer = explain(policy, { who, host, port, proto: 'tcp' }, facts, { lockdown });
      answers.set(key, explicitDeny(answer) ? answer : undefined);
    }
    return answers.get(key);
  };

  const cut: { socket: TcpSocket; because: Explanation }[] = [];
  for (const socket of sockets) {
    // A connection to one of this machine's own addresses leaves through lo, as loopback does;
    // a dual-stack socket names an IPv4 one v4-mapped, and the interfaces list it plain.
    const remote = unmapped(socket.remote.address);
    const host = local.has(remote) ? (isIPv4(remote) ? '127.0.0.1' : '::1') : socket.remote.address;
    const port = socket.remote.port;
    const gid = socket.inode === 0 ? undefined : live.get(socket.inode);
    const gids = named.size === 0 ? [] : gid !== undefined ? (named.has(gid) ? [gid] : []) : groupsOf(socket.uid);
    const because =
      ask({ kind: 'user', user: socket.uid }, host, port) ?? gids.map((g) => ask({ kind: 'group', group: g }, host, port)).find((e) => e !== undefined);
    if (because) cut.push({ socket, because });
  }
  return cut;
}

/** An IPv4-mapped address (::ffff:192.0.2.1, as sock_diag prints it) as the IPv4 address it is; any other as it is. */
function unmapped(address: string): string {
  return /^::ffff:\d{1,3}(\.\d{1,3}){3}$/i.test(address) ? address.slice(7) : address;
}

/**
 * Cuts what `socketsToCut` finds. A socket that cannot be destroyed is
 * reported in `failed`, and the sweep goes on with the rest; one that
 * cannot even be listed fails the sweep (EGD_SOCKETS_NOT_CUT).
 */
export function sweepSockets(policy: Policy, facts: ExplainFacts, lockdown: boolean, open: () => SocketAccess): SweepOutcome {
  let access: SocketAccess;
  let sockets: TcpSocket[];
  try {
    access = open();
  } catch (error) {
    throw notCut(error);
  }
  try {
    try {
      sockets = access.tcpSockets(SWEPT_STATES);
    } catch (error) {
      throw notCut(error);
    }
    const cut: CutConnection[] = [];
    const failed: { socket: string; reason: string }[] = [];
    let gone = 0;
    for (const { socket, because } of socketsToCut(policy, facts, lockdown, sockets, access)) {
      try {
        if (access.destroy(socket) === 'gone') gone++;
        else cut.push({ socket: describeSocket(socket), ruleId: because.ruleId });
      } catch (error) {
        failed.push({ socket: describeSocket(socket), reason: (error as Error).message });
      }
    }
    return { examined: sockets.length, cut, gone, failed };
  } finally {
    access.close();
  }
}

function notCut(error: unknown): EgressError {
  return new EgressError(ErrorCode.SocketsNotCut, `the TCP sockets of this network namespace could not be listed: ${(error as Error).message}`, {
    cause: error,
  });
}
