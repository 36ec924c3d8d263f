/**
 * The TCP sockets of this network namespace, and cutting one, through
 * sock_diag (NETLINK_SOCK_DIAG, <linux/inet_diag.h>): what `ss -K` does.
 *
 * inet_diag reports every TCP socket, orphans included — sockets whose
 * program closed them while data was still queued: the kernel goes on
 * sending it, with no file and so no owner that `meta skuid` could match.
 * What it reports outlives the file: the uid the socket was made with
 * (sk_uid), its cgroup (cgroup v2 id), its addresses, state and cookie. The
 * inode is 0 for an orphan. SOCK_DESTROY aborts a socket (tcp_abort: a
 * reset to the peer, ECONNABORTED to its program, queued data discarded);
 * it needs CAP_NET_ADMIN and a kernel built with CONFIG_INET_DIAG_DESTROY.
 */
import { isIP } from 'node:net';
import { addressGroups } from '../policy/destination.js';
import { NetlinkError, NetlinkFamily, NlmFlag, openNetlink, parseAttributes, type NetlinkMessage, type NetlinkSocket } from './netlink.js';

const SOCK_DIAG_BY_FAMILY = 20;
const SOCK_DESTROY = 21;
const AF_INET = 2;
const AF_INET6 = 10;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;
const INET_DIAG_CGROUP_ID = 21;
/** struct inet_diag_sockid: sport, dport, src[4], dst[4], if, cookie[2]. */
const SOCKID_LENGTH = 48;
/** struct inet_diag_msg: family, state, timer, retrans, sockid, expires, rqueue, wqueue, uid, inode. */
const DIAG_MSG_LENGTH = 4 + SOCKID_LENGTH + 20;

/** TCP states as the kernel numbers them (include/net/tcp_states.h). */
export const TcpState = {
  Established: 1,
  SynSent: 2,
  SynRecv: 3,
  FinWait1: 4,
  FinWait2: 5,
  TimeWait: 6,
  Close: 7,
  CloseWait: 8,
  LastAck: 9,
  Listen: 10,
  Closing: 11,
  NewSynRecv: 12,
} as const;

/** As the kernel's tcp_states.h spells them: ESTABLISHED, FIN_WAIT1, … */
const STATE_NAMES = new Map(Object.entries(TcpState).map(([name, value]) => [value, name.replace(/([a-z])([A-Z])/g, '$1_$2').toUpperCase()]));

export interface Endpoint {
  /** IPv4 dotted, IPv6 in RFC 5952 form; a v4-mapped address as ::ffff:a.b.c.d. */
  readonly address: string;
  readonly port: number;
}

export interface TcpSocket {
  /** The socket's family: a dual-stack socket is 6, with v4-mapped addresses. */
  readonly family: 4 | 6;
  readonly state: number;
  readonly local: Endpoint;
  readonly remote: Endpoint;
  /** The uid the socket was made with (sk_uid); it survives close(). */
  readonly uid: number;
  /** The socket's inode; 0 for an orphan (closed by its program, still sending). */
  readonly inode: number;
  readonly cookie: bigint;
  /** Its cgroup v2 id, when the kernel reports it. */
  readonly cgroupId: bigint | undefined;
  /** struct inet_diag_sockid as reported: destroy names the socket by it, cookie included. */
  readonly sockid: Buffer;
}

export function stateName(state: number): string {
  return STATE_NAMES.get(state as (typeof TcpState)[keyof typeof TcpState]) ?? `state ${state}`;
}

/** The bit mask of `states` for idiag_states. */
export function stateMask(states: readonly number[]): number {
  return states.reduce((mask, state) => (mask | (1 << state)) >>> 0, 0);
}

/** struct inet_diag_req_v2 for one family, with the states asked for and a socket id (zero for a dump). */
function request(family: 4 | 6, states: number, sockid?: Buffer, protocol = IPPROTO_TCP): Buffer {
  const out = Buffer.alloc(8 + SOCKID_LENGTH);
  out.writeUInt8(family === 4 ? AF_INET : AF_INET6, 0);
  out.writeUInt8(protocol, 1);
  out.writeUInt32LE(states >>> 0, 4);
  if (sockid) sockid.copy(out, 8);
  return out;
}

/** One inet_diag_msg (with its attributes) as a TcpSocket; a NetlinkError when it is malformed. */
export function parseTcpSocket(payload: Buffer): TcpSocket {
  const attributes = diagAttributes(payload);
  const familyCode = payload.readUInt8(0);
  if (familyCode !== AF_INET && familyCode !== AF_INET6)
    throw new NetlinkError(`sock_diag: an answer for address family ${familyCode}, neither AF_INET nor AF_INET6`);
  const family = familyCode === AF_INET ? 4 : 6;
  const sockid = Buffer.from(payload.subarray(4, 4 + SOCKID_LENGTH));
  return {
    family,
    state: payload.readUInt8(1),
    local: { address: formatAddress(family, sockid.subarray(4, 20)), port: sockid.readUInt16BE(0) },
    remote: { address: formatAddress(family, sockid.subarray(20, 36)), port: sockid.readUInt16BE(2) },
    uid: payload.readUInt32LE(4 + SOCKID_LENGTH + 12),
    inode: payload.readUInt32LE(4 + SOCKID_LENGTH + 16),
    cookie: BigInt(sockid.readUInt32LE(40)) | (BigInt(sockid.readUInt32LE(44)) << 32n),
    cgroupId: cgroupIdOf(attributes),
    sockid,
  };
}

/** The attributes after one inet_diag_msg; a NetlinkError when the message is short or they are malformed. */
function diagAttributes(payload: Buffer): Map<number, Buffer> {
  if (payload.length < DIAG_MSG_LENGTH)
    throw new NetlinkError(`sock_diag: an answer of ${payload.length} bytes, shorter than inet_diag_msg (${DIAG_MSG_LENGTH})`);
  return parseAttributes(payload.subarray(DIAG_MSG_LENGTH));
}

function cgroupIdOf(attributes: ReadonlyMap<number, Buffer>): bigint | undefined {
  const cgroup = attributes.get(INET_DIAG_CGROUP_ID);
  return cgroup && cgroup.length >= 8 ? cgroup.readBigUInt64LE(0) : undefined;
}

function formatAddress(family: 4 | 6, bytes: Buffer): string {
  if (family === 4) return [...bytes.subarray(0, 4)].join('.');
  const groups = Array.from({ length: 8 }, (_, i) => bytes.readUInt16BE(i * 2));
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) return `::ffff:${[...bytes.subarray(12, 16)].join('.')}`;
  // RFC 5952: the longest run of two or more zero groups (the first of equals) becomes "::".
  let best = { at: -1, length: 1 };
  for (let i = 0; i < 8;) {
    let j = i;
    while (j < 8 && groups[j] === 0) j++;
    if (j - i > best.length) best = { at: i, length: j - i };
    i = j === i ? i + 1 : j;
  }
  const hex = groups.map((g) => g.toString(16));
  if (best.at < 0) return hex.join(':');
  return `${hex.slice(0, best.at).join(':')}::${hex.slice(best.at + best.length).join(':')}`;
}

/** The TCP sockets of both families in `states` (a stateMask). */
export function dumpTcpSockets(netlink: NetlinkSocket, states: number): TcpSocket[] {
  return [...dumpTcp(netlink, states)].map(parseTcpSocket);
}

/**
 * The cgroup ids the TCP sockets of both families in `states` carry: the
 * attribute alone, nothing else of a socket read — a dump of 100,000
 * sockets parsed whole (addresses formatted) costs ~0.6 s of the event loop.
 */
export function dumpTcpCgroupIds(netlink: NetlinkSocket, states: number): Set<bigint> {
  const ids = new Set<bigint>();
  for (const payload of dumpTcp(netlink, states)) {
    const id = cgroupIdOf(diagAttributes(payload));
    if (id !== undefined) ids.add(id);
  }
  return ids;
}

/** Each inet_diag_msg a dump of the TCP sockets of both families in `states` answers. */
function* dumpTcp(netlink: NetlinkSocket, states: number): Generator<Buffer> {
  for (const family of [4, 6] as const) {
    for (const message of netlink.request(SOCK_DIAG_BY_FAMILY, NlmFlag.Dump, request(family, states))) {
      if (message.type !== SOCK_DIAG_BY_FAMILY) throw new NetlinkError(`sock_diag: an answer of message type ${message.type} to a dump of sockets`);
      yield message.payload;
    }
  }
}

/**
 * Aborts one socket, named by the id the dump reported (cookie included, so
 * a socket made since on the same addresses is never hit). "gone": there is
 * no such socket any more (it closed, or its cookie names another one).
 */
export function destroyTcpSocket(netlink: NetlinkSocket, socket: Pick<TcpSocket, 'family' | 'sockid'>): 'destroyed' | 'gone' {
  try {
    netlink.request(SOCK_DESTROY, NlmFlag.Ack, request(socket.family, 0, socket.sockid));
    return 'destroyed';
  } catch (error) {
    // ENOENT: not found; ESTALE: the cookie does not match the socket now on those addresses.
    if (error instanceof NetlinkError && (error.errno === 2 || error.errno === 116)) return 'gone';
    throw error;
  }
}

/** A socket named by its own address and its peer's, as the process that holds it sees them. */
export interface SocketQuery {
  readonly protocol: 'tcp' | 'udp';
  /** The socket's own address and port. */
  readonly local: Endpoint;
  /** Its peer's: the address it is connected to, or (a UDP socket that is not connected) the one it sent to. */
  readonly remote: Endpoint;
  /**
   * The interface the peer's packets reach the socket on (idiag_if): a
   * socket bound to another device is not found. Default 1, loopback,
   * which every network namespace numbers 1: a query from this machine's
   * own process arrives there, whatever address it was sent to.
   */
  readonly ifindex?: number;
}

/** idiag_cookie: no cookie to check, any socket on these addresses. */
const INET_DIAG_NOCOOKIE = 0xffffffff;
const LOOPBACK_IFINDEX = 1;

/**
 * The kernel's exact lookup (SOCK_DIAG_BY_FAMILY without NLM_F_DUMP) reads
 * the socket id in a different order for each protocol, as measured on
 * Linux 6.x (test/resolver/who-kernel.test.ts) and as the kernel's sources
 * say:
 * - TCP (inet_diag_find_one_icsk): src is the socket's own address, dst its
 *   peer's — the order a dump reports;
 * - UDP (udp_dump_one, "src and dst are swapped for historical reasons"):
 *   src is the peer, dst the socket's own, because it is looked up as the
 *   socket a packet from src to dst would be delivered to. That is also
 *   what finds a socket that is not connected (dig, dnsperf): it is
 *   delivered packets from anyone to its own address and port.
 * The other order names the peer's socket: for a resolver asking about its
 * client, its own listening socket, owned by root.
 */
export function socketId(query: SocketQuery): { family: 4 | 6; sockid: Buffer } {
  const unmapped = (endpoint: Endpoint): Endpoint => ({ address: endpoint.address.replace(/^::ffff:(?=\d+\.\d+\.\d+\.\d+$)/i, ''), port: endpoint.port });
  const local = unmapped(query.local);
  const remote = unmapped(query.remote);
  const family = isIP(local.address);
  if (family === 0 || family !== isIP(remote.address))
    throw new NetlinkError(`sock_diag: ${query.local.address} and ${query.remote.address} are not two addresses of one family`);
  const [src, dst] = query.protocol === 'tcp' ? [local, remote] : [remote, local];
  const sockid = Buffer.alloc(SOCKID_LENGTH);
  sockid.writeUInt16BE(src.port, 0);
  sockid.writeUInt16BE(dst.port, 2);
  writeAddress(family === 4 ? 4 : 6, src.address, sockid, 4);
  writeAddress(family === 4 ? 4 : 6, dst.address, sockid, 20);
  sockid.writeUInt32LE(query.ifindex ?? LOOPBACK_IFINDEX, 36);
  sockid.writeUInt32LE(INET_DIAG_NOCOOKIE, 40);
  sockid.writeUInt32LE(INET_DIAG_NOCOOKIE, 44);
  return { family: family === 4 ? 4 : 6, sockid };
}

function writeAddress(family: 4 | 6, address: string, out: Buffer, at: number): void {
  addressGroups(family, address).forEach((group, i) => out.writeUInt16BE(group, at + i * 2));
}

/**
 * The one socket `query` names, through the kernel's exact lookup (no dump:
 * its cost does not grow with the sockets of the namespace); undefined when
 * there is none. A TCP socket in TIME_WAIT is none: the kernel reports it
 * with uid 0, which is nobody's.
 */
export function findSocket(netlink: NetlinkSocket, query: SocketQuery): TcpSocket | undefined {
  const found = findSockets(netlink, [query])[0];
  if (found instanceof Error) throw found;
  return found;
}

const LOOKUPS_PER_DATAGRAM = 32;

function lookupRequest(query: SocketQuery): { type: number; flags: number; payload: Buffer } {
  const { family, sockid } = socketId(query);
  return { type: SOCK_DIAG_BY_FAMILY, flags: 0, payload: request(family, 0xffffffff, sockid, query.protocol === 'tcp' ? IPPROTO_TCP : IPPROTO_UDP) };
}

/**
 * `findSocket` for several queries, sent to the kernel in one datagram: for
 * each, its socket, undefined, or the error its lookup failed with. Each
 * lookup is the kernel's own, made when the datagram is read, so each sees
 * the sockets as they are then.
 */
export function findSockets(netlink: NetlinkSocket, queries: readonly SocketQuery[]): (TcpSocket | undefined | NetlinkError)[] {
  const requests: { type: number; flags: number; payload: Buffer }[] = [];
  const failed = new Map<number, NetlinkError>();
  queries.forEach((query, i) => {
    try {
      requests.push(lookupRequest(query));
    } catch (error) {
      if (!(error instanceof NetlinkError)) throw error;
      failed.set(i, error);
    }
  });
  // At most LOOKUPS_PER_DATAGRAM answers queued at once: far under a netlink socket's default receive buffer, which would drop the rest.
  const results: (NetlinkMessage[] | NetlinkError)[] = [];
  for (let at = 0; at < requests.length; at += LOOKUPS_PER_DATAGRAM) results.push(...netlink.requestEach(requests.slice(at, at + LOOKUPS_PER_DATAGRAM)));
  let next = 0;
  return queries.map((query, i) => failed.get(i) ?? foundSocket(query, results[next++]!));
}

function foundSocket(query: SocketQuery, answers: NetlinkMessage[] | NetlinkError): TcpSocket | undefined | NetlinkError {
  if (answers instanceof NetlinkError) return answers.errno === 2 ? undefined : answers;
  const message = answers[0];
  if (answers.length !== 1 || message?.type !== SOCK_DIAG_BY_FAMILY)
    return new NetlinkError(`sock_diag: ${answers.length} answers (type ${message?.type}) to an exact lookup, not one socket`);
  let socket: TcpSocket;
  try {
    socket = parseTcpSocket(message.payload);
  } catch (error) {
    return error as NetlinkError;
  }
  // Not the connection asked about: the kernel's lookup of a TCP socket falls back to a listener; TIME_WAIT and NEW_SYN_RECV report uid 0.
  if (query.protocol === 'tcp' && (socket.state === TcpState.TimeWait || socket.state === TcpState.NewSynRecv || socket.state === TcpState.Listen))
    return undefined;
  // The socket found must have the port that sent: a UDP lookup is a delivery lookup, and may name a wildcard socket of another port's owner.
  if (socket.local.port !== query.local.port) return undefined;
  return socket;
}

/** sock_diag of this network namespace, open until `close`. */
export interface SockDiag {
  tcpSockets(states: number): TcpSocket[];
  /** The cgroup ids the sockets in `states` carry (dumpTcpCgroupIds). */
  tcpCgroupIds(states: number): Set<bigint>;
  /** The socket `query` names (findSocket), or undefined. */
  find(query: SocketQuery): TcpSocket | undefined;
  /** `find` for several, in one round trip (findSockets). */
  findMany(queries: readonly SocketQuery[]): (TcpSocket | undefined | NetlinkError)[];
  destroy(socket: TcpSocket): 'destroyed' | 'gone';
  close(): void;
}

export function openSockDiag(): SockDiag {
  const netlink = openNetlink(NetlinkFamily.SockDiag);
  return {
    tcpSockets: (states) => dumpTcpSockets(netlink, states),
    tcpCgroupIds: (states) => dumpTcpCgroupIds(netlink, states),
    destroy: (socket) => destroyTcpSocket(netlink, socket),
    find: (query) => findSocket(netlink, query),
    findMany: (queries) => findSockets(netlink, queries),
    close: () => netlink.close(),
  };
}
