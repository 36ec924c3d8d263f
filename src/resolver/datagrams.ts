/**
 * The resolver's UDP sockets, read and written many datagrams per system
 * call through their descriptors (libc through koffi, as netlink.ts does):
 * recvmmsg(2) takes what is queued, sendmmsg(2) sends the replies that are
 * ready. Node's dgram costs a system call, a libuv callback and a JS object
 * or two per datagram each way — measured here, that alone capped a warm
 * cache near dnsmasq's rate before any DNS work was done (a bare echo:
 * 153k qps through dgram, 322k through recvmmsg/sendmmsg at ~47 datagrams a
 * call).
 *
 * Waiting is Node's own: each socket is a dgram socket, so its event loop
 * wakes when a query comes (a thread of libuv's pool polling for it cost a
 * second thread wake-up per query at moderate load: p50 0.72 ms against
 * 0.28 ms on a loaded machine); the first datagram of a wake-up comes
 * through dgram, what is queued behind it is read at once through its
 * descriptor with recvmmsg, and every reply goes out through sendmmsg.
 *
 * A round read through recvmmsg is first offered, where it lies, to the
 * caller's round handler (options.inPlace), which may write replies straight
 * into the send slots — a kept reply copied in with its id and TTL — sent
 * with one sendmmsg before the next round is read: no Buffer, closure or
 * promise per datagram on that path (the pipeline's memo key is the one
 * string). The rest is copied out and goes to the datagram handler, its
 * replies sent on the next turn.
 *
 * Every buffer the kernel is given lives in one arena allocated once: a
 * small typed array may live on V8's heap, where a collection can move it
 * while the kernel holds its address.
 */
import dgram from 'node:dgram';
import { createRequire } from 'node:module';
import { isIPv6 } from 'node:net';
import { addressGroups, formatGroups } from '../policy/destination.js';

/** Datagrams taken or sent per system call. */
const BATCH = 64;
/** The largest query read whole; a longer one is cut, which a DNS query never is (EDNS clients offer 1232–4096 for replies, queries are small). */
const RECEIVE_BYTES = 4096;
/** The most a reply may be (message.ts's MAX_UDP_REPLY). */
const SEND_BYTES = 4096;
/** Receive rounds per wake before the handler's replies go out and the poll is asked again: bounds a round's latency under a flood (replies written in place go at the end of each round). */
const ROUNDS = 4;
const SOCKADDR_BYTES = 28;
const MMSGHDR_BYTES = 64;
const IOVEC_BYTES = 16;

const AF_INET = 2;
const AF_INET6 = 10;
const MSG_DONTWAIT = 0x40;
const SOL_SOCKET = 1;
const SO_RCVBUF = 8;
const SO_RCVBUFFORCE = 33;
/** What the kernel may queue for a socket: ~4,000 small queries. */
const RECEIVE_BUFFER = 4 << 20;

export interface Peer {
  readonly address: string;
  readonly port: number;
}

/** Told of each datagram; `reply` sends the answer (at most once) through the socket it came in on. */
export type DatagramHandler = (raw: Buffer, from: Peer, local: Peer, reply: (bytes: Buffer) => void) => void;

/**
 * The datagrams one recvmmsg took, where the kernel put them, valid only
 * during the call it is handed to: datagram i is
 * `data[offset(i), offset(i) + length(i))`.
 */
export interface DatagramRound {
  readonly count: number;
  readonly data: Buffer;
  offset(i: number): number;
  length(i: number): number;
  /** Equal for two datagrams of the round only if they came from the same address and port (over IPv4 exactly then; over IPv6 the flow label is in it too). */
  senderKey(i: number): number | string;
  sender(i: number): Peer;
  /**
   * Sends a copy of `bytes` (at most 4096) to i's sender when the round's
   * replies go, at the end of the call; the copy lies in `out` from the
   * offset returned, to be edited there before the call returns. At most
   * once per datagram: a datagram given a reply here never reaches the
   * DatagramHandler.
   */
  reply(i: number, bytes: Buffer): number;
  readonly out: Buffer;
}

/**
 * Told of each round read through recvmmsg before any of its datagrams is
 * copied out: what it answers through `round.reply` goes back in place, in
 * one sendmmsg; the others go to the DatagramHandler as usual. Not told of
 * datagrams read one at a time (the first of a wake-up, which dgram reads,
 * and every one on an unbatched socket).
 */
export type RoundHandler = (round: DatagramRound, local: Peer) => void;

export interface DatagramServer {
  /** Binds one more socket (exclusively: no SO_REUSEADDR/REUSEPORT) and reads it; port 0 takes a free one. Resolves to the port; rejects as dgram's bind does (code EADDRINUSE, …). */
  bind(address: string, port: number): Promise<number>;
  /** Replies the kernel would not send. */
  readonly sendErrors: number;
  /** Sockets read one datagram at a time (Node did not show their descriptor, or `batched: false`). */
  readonly unbatched: number;
  /** Closes every socket; resolves once their ports are free. */
  close(): Promise<void>;
}

interface Bound {
  readonly socket: dgram.Socket;
  /** -1: Node did not show it, and this socket goes one datagram at a time through dgram. */
  readonly fd: number;
  readonly local: Peer;
  readonly v6: boolean;
  /** Replies waiting for the next sendmmsg: the peer's sockaddr as received, and the bytes. */
  readonly out: { name: () => Buffer; peer: Peer; bytes: Buffer }[];
}

/**
 * `batched` false: every socket one datagram at a time through dgram (what happens anyway, logged once by the caller, when
 * a Node.js no longer shows a socket's descriptor); tests run both ways.
 */
export function createDatagramServer(
  handler: DatagramHandler,
  onError: (error: unknown) => void,
  options: { batched?: boolean; inPlace?: RoundHandler } = {},
): DatagramServer {
  // Loaded here, not imported at the top: a koffi without a build for this platform is an error of this call, not of every importer.
  const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  const libc = koffi.load('libc.so.6');
  const setsockopt = libc.func('int setsockopt(int, int, int, void *, uint32_t)') as (
    fd: number,
    level: number,
    name: number,
    value: Buffer,
    length: number,
  ) => number;
  const recvmmsg = libc.func('int recvmmsg(int, void *, unsigned int, int, void *)') as (
    fd: number,
    vec: Buffer,
    n: number,
    flags: number,
    timeout: null,
  ) => number;
  const sendmmsg = libc.func('int sendmmsg(int, void *, unsigned int, int)') as (fd: number, vec: Buffer, n: number, flags: number) => number;

  // One arena for everything the kernel writes or reads by address (see the module's comment).
  const layout = {
    inData: BATCH * RECEIVE_BYTES,
    inNames: BATCH * SOCKADDR_BYTES,
    inIov: BATCH * IOVEC_BYTES,
    inHdr: BATCH * MMSGHDR_BYTES,
    outData: BATCH * SEND_BYTES,
    outNames: BATCH * SOCKADDR_BYTES,
    outIov: BATCH * IOVEC_BYTES,
    outHdr: BATCH * MMSGHDR_BYTES,
  };
  const arena = Buffer.alloc(Object.values(layout).reduce((sum, n) => sum + ((n + 63) & ~63), 0));
  let used = 0;
  const take = (n: number): Buffer => {
    const slice = arena.subarray(used, used + n);
    used += (n + 63) & ~63;
    return slice;
  };
  const inData = take(layout.inData);
  const inNames = take(layout.inNames);
  const inIov = take(layout.inIov);
  const inHdr = take(layout.inHdr);
  const outData = take(layout.outData);
  const outNames = take(layout.outNames);
  const outIov = take(layout.outIov);
  const outHdr = take(layout.outHdr);
  const at = (buffer: Buffer, offset: number): bigint => koffi.address(buffer) + BigInt(offset);
  // struct mmsghdr: msghdr { name, namelen, iov, iovlen, control, controllen, flags } then msg_len, 64 bytes on x86_64 and arm64.
  for (let i = 0; i < BATCH; i++) {
    inIov.writeBigUInt64LE(at(inData, i * RECEIVE_BYTES), i * IOVEC_BYTES);
    inIov.writeBigUInt64LE(BigInt(RECEIVE_BYTES), i * IOVEC_BYTES + 8);
    inHdr.writeBigUInt64LE(at(inNames, i * SOCKADDR_BYTES), i * MMSGHDR_BYTES);
    inHdr.writeBigUInt64LE(at(inIov, i * IOVEC_BYTES), i * MMSGHDR_BYTES + 16);
    inHdr.writeBigUInt64LE(1n, i * MMSGHDR_BYTES + 24);
    outIov.writeBigUInt64LE(at(outData, i * SEND_BYTES), i * IOVEC_BYTES);
    outHdr.writeBigUInt64LE(at(outNames, i * SOCKADDR_BYTES), i * MMSGHDR_BYTES);
    outHdr.writeBigUInt64LE(at(outIov, i * IOVEC_BYTES), i * MMSGHDR_BYTES + 16);
    outHdr.writeBigUInt64LE(1n, i * MMSGHDR_BYTES + 24);
  }

  const sockets: Bound[] = [];
  let sendErrors = 0;
  let unbatched = 0;
  let closed = false;
  let flushing = false;

  const peerOf = (name: Buffer, v6: boolean): Peer => {
    if (!v6) return { address: `${name[4]}.${name[5]}.${name[6]}.${name[7]}`, port: name.readUInt16BE(2) };
    const groups = Array.from({ length: 8 }, (_, i) => name.readUInt16BE(8 + i * 2));
    return { address: formatGroups(6, groups), port: name.readUInt16BE(2) };
  };

  /** Sends the first `count` reply slots through `fd`; what the kernel refuses is counted and skipped, as Node's send would have failed it. */
  const sendSlots = (fd: number, count: number): void => {
    let sent = 0;
    while (sent < count) {
      const n = sendmmsg(fd, sent === 0 ? outHdr : outHdr.subarray(sent * MMSGHDR_BYTES), count - sent, MSG_DONTWAIT);
      // The first of those left could not go (a full send buffer, a peer the kernel refuses).
      if (n <= 0) {
        sendErrors++;
        sent++;
      } else sent += n;
    }
  };
  /** Puts `bytes` to `sockaddr` (from `at`, `length` bytes long) in reply slot `slot`. */
  const fillSlot = (slot: number, bytes: Buffer, sockaddr: Buffer, at: number, length: number): void => {
    const size = Math.min(bytes.length, SEND_BYTES);
    outData.set(size === bytes.length ? bytes : bytes.subarray(0, size), slot * SEND_BYTES);
    outNames.set(sockaddr.subarray(at, at + length), slot * SOCKADDR_BYTES);
    // iov_len's upper half stays 0 (the arena starts zeroed; a reply is at most SEND_BYTES): no BigInt per reply.
    outIov.writeUInt32LE(size, slot * IOVEC_BYTES + 8);
    outHdr.writeUInt32LE(length, slot * MMSGHDR_BYTES + 8);
  };

  const flush = (): void => {
    flushing = false;
    for (const bound of sockets) {
      if (bound.fd < 0) {
        for (const { peer, bytes } of bound.out.splice(0)) bound.socket.send(bytes, peer.port, peer.address, (error) => error && sendErrors++);
        continue;
      }
      while (bound.out.length > 0 && !closed) {
        const round = bound.out.splice(0, BATCH);
        round.forEach(({ name, bytes }, i) => {
          const sockaddr = name();
          fillSlot(i, bytes, sockaddr, 0, sockaddr.length);
        });
        sendSlots(bound.fd, round.length);
      }
    }
  };
  const scheduleFlush = (): void => {
    if (flushing) return;
    flushing = true;
    setImmediate(flush);
  };

  const take1 = (bound: Bound, raw: Buffer, peer: Peer, name: () => Buffer): void => {
    let answered = false;
    try {
      handler(raw, peer, bound.local, (bytes) => {
        if (answered || closed) return;
        answered = true;
        bound.out.push({ name, peer, bytes });
        scheduleFlush();
      });
    } catch (error) {
      onError(error);
    }
  };

  /** The round handed to options.inPlace: one object, its fields those of the round being read. */
  const received = {
    count: 0,
    v6: false,
    /** Reply slots taken this round. */
    replies: 0,
    answered: new Uint8Array(BATCH),
  };
  const nameLength = (i: number): number => inHdr.readUInt32LE(i * MMSGHDR_BYTES + 8);
  const round: DatagramRound = {
    get count() {
      return received.count;
    },
    data: inData,
    out: outData,
    offset: (i) => i * RECEIVE_BYTES,
    length: (i) => Math.min(inHdr.readUInt32LE(i * MMSGHDR_BYTES + 56), RECEIVE_BYTES),
    senderKey(i) {
      const at = i * SOCKADDR_BYTES;
      // IPv4: address and port in one number; IPv6: port, flow label, address and scope as a string (a flow label that differs only costs a second lookup).
      return received.v6 ? inNames.toString('latin1', at + 2, at + nameLength(i)) : inNames.readUInt32BE(at + 4) * 65536 + inNames.readUInt16BE(at + 2);
    },
    sender: (i) => peerOf(inNames.subarray(i * SOCKADDR_BYTES, i * SOCKADDR_BYTES + nameLength(i)), received.v6),
    reply(i, bytes) {
      if (received.answered[i] === 1 || i >= received.count) throw new Error(`datagram ${i} of the round cannot be answered again`);
      received.answered[i] = 1;
      const slot = received.replies++;
      fillSlot(slot, bytes, inNames, i * SOCKADDR_BYTES, nameLength(i));
      return slot * SEND_BYTES;
    },
  };

  /** Reads what `bound` has queued (up to ROUNDS batches) into the handlers; how many datagrams. */
  const drain = (bound: Bound): number => {
    let taken = 0;
    for (let r = 0; r < ROUNDS && !closed; r++) {
      for (let i = 0; i < BATCH; i++) inHdr.writeUInt32LE(SOCKADDR_BYTES, i * MMSGHDR_BYTES + 8);
      const n = recvmmsg(bound.fd, inHdr, BATCH, MSG_DONTWAIT, null);
      if (n <= 0) return taken;
      taken += n;
      received.count = n;
      received.v6 = bound.v6;
      received.replies = 0;
      received.answered.fill(0);
      if (options.inPlace !== undefined) {
        try {
          options.inPlace(round, bound.local);
        } catch (error) {
          onError(error);
        }
        // Before anything else may use the reply slots (flush, on a later turn).
        if (received.replies > 0) sendSlots(bound.fd, received.replies);
      }
      for (let i = 0; i < n; i++) {
        if (received.answered[i] === 1) continue;
        const length = round.length(i);
        // Copies: the arena is read into again while the pipeline still holds a query.
        const raw = Buffer.from(inData.subarray(i * RECEIVE_BYTES, i * RECEIVE_BYTES + length));
        const name = Buffer.from(inNames.subarray(i * SOCKADDR_BYTES, i * SOCKADDR_BYTES + nameLength(i)));
        take1(bound, raw, peerOf(name, bound.v6), () => name);
      }
      received.count = 0;
      if (n < BATCH) return taken;
    }
    return taken;
  };

  /** The peer's struct sockaddr, for a datagram that came through dgram. */
  const sockaddrOf = (v6: boolean, peer: Peer): Buffer => {
    const name = Buffer.alloc(v6 ? 28 : 16);
    name.writeUInt16LE(v6 ? AF_INET6 : AF_INET, 0);
    name.writeUInt16BE(peer.port, 2);
    if (v6) addressGroups(6, peer.address).forEach((group, i) => name.writeUInt16BE(group, 8 + i * 2));
    else addressGroups(4, peer.address).forEach((group, i) => name.writeUInt16BE(group, 4 + i * 2));
    return name;
  };

  return {
    async bind(address, port) {
      const v6 = isIPv6(address);
      const socket = dgram.createSocket({ type: v6 ? 'udp6' : 'udp4', ipv6Only: v6 });
      await new Promise<void>((resolve, reject) => {
        socket.once('error', reject);
        socket.bind({ address, port, exclusive: true }, () => {
          socket.off('error', reject);
          resolve();
        });
      });
      const fd = options.batched === false ? -1 : (descriptorOf(socket) ?? -1);
      if (fd < 0) {
        unbatched++;
        socket.setRecvBufferSize(RECEIVE_BUFFER / 2);
      } else {
        // Room for a burst while the main thread is busy (the kernel doubles it; FORCE past rmem_max needs CAP_NET_ADMIN).
        const room = Buffer.alloc(4);
        room.writeInt32LE(RECEIVE_BUFFER / 2, 0);
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, room, 4) !== 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, room, 4);
      }
      const bound: Bound = { socket, fd, local: { address, port: socket.address().port }, v6, out: [] };
      sockets.push(bound);
      socket.on('error', onError);
      socket.on('message', (raw, from) => {
        if (closed) return;
        const peer = { address: from.address, port: from.port };
        take1(bound, raw, peer, () => sockaddrOf(v6, peer));
        // What queued behind it: many at a time.
        if (fd >= 0) drain(bound);
      });
      return bound.local.port;
    },
    get sendErrors() {
      return sendErrors;
    },
    get unbatched() {
      return unbatched;
    },
    async close() {
      if (closed) return;
      closed = true;
      await Promise.all(sockets.splice(0).map((bound) => new Promise<void>((resolve) => bound.socket.close(() => resolve()))));
    },
  };
}

/** The descriptor of a bound dgram socket: Node keeps it on the socket's handle, which it does not document (`_handle` is deprecated, DEP0112). */
function descriptorOf(socket: dgram.Socket): number | undefined {
  const state = Object.getOwnPropertySymbols(socket).find((symbol) => symbol.description === 'state symbol');
  const handle = state === undefined ? undefined : (socket as unknown as Record<symbol, { handle?: { fd?: unknown } } | undefined>)[state]?.handle;
  return typeof handle?.fd === 'number' && handle.fd >= 0 ? handle.fd : undefined;
}
