/**
 * The resolver's UDP sockets, egressd's own (libc through koffi, as
 * netlink.ts does), read and written many datagrams per system call:
 * recvmmsg(2) takes what is queued, sendmmsg(2) sends the replies that are
 * ready. Node's dgram costs a system call, a libuv callback and a JS object
 * or two per datagram each way — measured here, that alone capped a warm
 * cache near dnsmasq's rate before any DNS work was done (a bare echo:
 * 153k qps through dgram, 322k through recvmmsg/sendmmsg at ~47 datagrams a
 * call).
 *
 * Waiting costs one thread of libuv's pool for all the sockets together: a
 * poll(2) on every socket, the main thread draining what it reports
 * (MSG_DONTWAIT) and polling again once the replies of that round are out.
 * Closing shuts the sockets down, which wakes the poll, and closes them
 * once it has returned, so a number is never reused under a poll.
 *
 * Every buffer the kernel is given lives in one arena allocated once: a
 * small typed array may live on V8's heap, where a collection can move it
 * while the kernel holds its address.
 */
import { createRequire } from 'node:module';
import { isIPv6 } from 'node:net';
import { addressGroups, formatGroups } from '../policy/destination.js';

/** Datagrams taken or sent per system call. */
const BATCH = 64;
/** The largest query read whole; a longer one is cut, which a DNS query never is (EDNS clients offer 1232–4096 for replies, queries are small). */
const RECEIVE_BYTES = 4096;
/** The most a reply may be (message.ts's MAX_UDP_REPLY). */
const SEND_BYTES = 4096;
/** Receive rounds per wake before replies go out and the poll is asked again: bounds a round's latency under a flood. */
const ROUNDS = 4;
const SOCKADDR_BYTES = 28;
const MMSGHDR_BYTES = 64;
const IOVEC_BYTES = 16;

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const IPPROTO_IPV6 = 41;
const IPV6_V6ONLY = 26;
const MSG_DONTWAIT = 0x40;
const SOL_SOCKET = 1;
const SO_RCVBUF = 8;
const SO_RCVBUFFORCE = 33;
/** What the kernel may queue for a socket: ~4,000 small queries. */
const RECEIVE_BUFFER = 4 << 20;
const SHUT_RDWR = 2;
const POLLIN = 1;

export interface Peer {
  readonly address: string;
  readonly port: number;
}

/** Told of each datagram; `reply` sends the answer (at most once) through the socket it came in on. */
export type DatagramHandler = (raw: Buffer, from: Peer, local: Peer, reply: (bytes: Buffer) => void) => void;

export interface DatagramServer {
  /** Binds one more socket (exclusively: no SO_REUSEADDR/REUSEPORT); port 0 takes a free one. Returns the port. Throws an Error with the errno's name as `code` (EADDRINUSE, …). */
  bind(address: string, port: number): number;
  /** Starts reading every bound socket. */
  start(): void;
  /** Replies the kernel would not send. */
  readonly sendErrors: number;
  /** Closes every socket; resolves once their ports are free. */
  close(): Promise<void>;
}

interface Bound {
  readonly fd: number;
  readonly local: Peer;
  readonly v6: boolean;
  /** Replies waiting for the next sendmmsg: the peer's sockaddr as received, and the bytes. */
  readonly out: { name: Buffer; bytes: Buffer }[];
}

export function createDatagramServer(handler: DatagramHandler, onError: (error: unknown) => void): DatagramServer {
  // Loaded here, not imported at the top: a koffi without a build for this platform is an error of this call, not of every importer.
  const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  const libc = koffi.load('libc.so.6');
  const socket = libc.func('int socket(int, int, int)') as (domain: number, type: number, protocol: number) => number;
  const bindFd = libc.func('int bind(int, void *, uint32_t)') as (fd: number, addr: Buffer, length: number) => number;
  const getsockname = libc.func('int getsockname(int, void *, void *)') as (fd: number, addr: Buffer, length: Buffer) => number;
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
  const shutdown = libc.func('int shutdown(int, int)') as (fd: number, how: number) => number;
  const closeFd = libc.func('int close(int)') as (fd: number) => number;
  const poll = libc.func('int poll(void *, uint64_t, int)');
  const errnoName = (errno: number): string => Object.entries(koffi.os.errno).find(([, value]) => value === errno)?.[0] ?? `errno ${errno}`;

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
    pollfds: 64 * 8,
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
  const pollfds = take(layout.pollfds);
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
  let started = false;
  let closed = false;
  let polling: Promise<void> | undefined;
  let flushing = false;

  const peerOf = (name: Buffer, v6: boolean): Peer => {
    if (!v6) return { address: `${name[4]}.${name[5]}.${name[6]}.${name[7]}`, port: name.readUInt16BE(2) };
    const groups = Array.from({ length: 8 }, (_, i) => name.readUInt16BE(8 + i * 2));
    return { address: formatGroups(6, groups), port: name.readUInt16BE(2) };
  };

  const flush = (): void => {
    flushing = false;
    for (const bound of sockets) {
      while (bound.out.length > 0 && !closed) {
        const round = bound.out.splice(0, BATCH);
        round.forEach(({ name, bytes }, i) => {
          bytes.copy(outData, i * SEND_BYTES, 0, SEND_BYTES);
          name.copy(outNames, i * SOCKADDR_BYTES);
          outIov.writeBigUInt64LE(BigInt(Math.min(bytes.length, SEND_BYTES)), i * IOVEC_BYTES + 8);
          outHdr.writeUInt32LE(name.length, i * MMSGHDR_BYTES + 8);
        });
        let sent = 0;
        while (sent < round.length) {
          const n = sendmmsg(bound.fd, sent === 0 ? outHdr : outHdr.subarray(sent * MMSGHDR_BYTES), round.length - sent, MSG_DONTWAIT);
          // The first of those left could not go (a full send buffer, a peer the kernel refuses): it is counted and skipped, as Node's send would have failed it.
          if (n <= 0) {
            sendErrors++;
            sent++;
          } else sent += n;
        }
      }
    }
  };
  const scheduleFlush = (): void => {
    if (flushing) return;
    flushing = true;
    setImmediate(flush);
  };

  /** Reads what `bound` has queued (up to ROUNDS batches) into the handler; how many datagrams. */
  const drain = (bound: Bound): number => {
    let taken = 0;
    for (let round = 0; round < ROUNDS && !closed; round++) {
      for (let i = 0; i < BATCH; i++) inHdr.writeUInt32LE(SOCKADDR_BYTES, i * MMSGHDR_BYTES + 8);
      const n = recvmmsg(bound.fd, inHdr, BATCH, MSG_DONTWAIT, null);
      if (n <= 0) return taken;
      taken += n;
      for (let i = 0; i < n; i++) {
        const length = inHdr.readUInt32LE(i * MMSGHDR_BYTES + 56);
        const nameLength = inHdr.readUInt32LE(i * MMSGHDR_BYTES + 8);
        // Copies: the arena is read into again while the pipeline still holds a query.
        const raw = Buffer.from(inData.subarray(i * RECEIVE_BYTES, i * RECEIVE_BYTES + Math.min(length, RECEIVE_BYTES)));
        const name = Buffer.from(inNames.subarray(i * SOCKADDR_BYTES, i * SOCKADDR_BYTES + nameLength));
        let answered = false;
        try {
          handler(raw, peerOf(name, bound.v6), bound.local, (bytes) => {
            if (answered || closed) return;
            answered = true;
            bound.out.push({ name, bytes });
            scheduleFlush();
          });
        } catch (error) {
          onError(error);
        }
      }
      if (n < BATCH) return taken;
    }
    return taken;
  };

  /**
   * After a round: its replies go out, then whatever came meanwhile is read
   * at once; only a round that finds nothing waits on the poll's thread
   * (under load, a thread's wake-up per round was a fifth of the time spent
   * idle). Each round is its own turn of the event loop, so the rest of
   * egressd is never starved.
   */
  const turn = (): void => {
    if (flushing) flush();
    if (closed) return;
    let taken = 0;
    for (const bound of sockets) taken += drain(bound);
    if (taken > 0) setImmediate(turn);
    else wait();
  };

  const wait = (): void => {
    if (closed) return;
    sockets.forEach((bound, i) => {
      pollfds.writeInt32LE(bound.fd, i * 8);
      pollfds.writeInt16LE(POLLIN, i * 8 + 4);
      pollfds.writeInt16LE(0, i * 8 + 6);
    });
    polling = new Promise<void>((resolve) => {
      poll.async(pollfds, sockets.length, -1, (error: unknown) => {
        polling = undefined;
        resolve();
        if (closed) return;
        if (error) onError(error);
        sockets.forEach((bound, i) => {
          if (pollfds.readInt16LE(i * 8 + 6) !== 0) drain(bound);
        });
        // Replies of this round (the warm ones are ready once its microtasks ran) go out first.
        setImmediate(turn);
      });
    });
  };

  return {
    bind(address, port) {
      const v6 = isIPv6(address);
      if (sockets.length >= layout.pollfds / 8) throw new Error('too many resolver sockets');
      const fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      const fail = (what: string): Error => {
        const errno = koffi.errno();
        const error = new Error(`${what} ${address}#${port}: ${errnoName(errno)}`) as NodeJS.ErrnoException;
        error.code = errnoName(errno);
        error.errno = errno;
        return error;
      };
      if (fd < 0) throw fail('socket for');
      try {
        const name = Buffer.alloc(SOCKADDR_BYTES);
        name.writeUInt16LE(v6 ? AF_INET6 : AF_INET, 0);
        name.writeUInt16BE(port, 2);
        if (v6) {
          const one = Buffer.alloc(4);
          one.writeInt32LE(1, 0);
          if (setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, one, 4) !== 0) throw fail('IPV6_V6ONLY on');
          addressGroups(6, address).forEach((group, i) => name.writeUInt16BE(group, 8 + i * 2));
        } else addressGroups(4, address).forEach((group, i) => name.writeUInt16BE(group, 4 + i * 2));
        // Room for a burst while the main thread is busy or the poll's thread is slow to wake (the kernel doubles it; FORCE past rmem_max needs CAP_NET_ADMIN).
        const room = Buffer.alloc(4);
        room.writeInt32LE(RECEIVE_BUFFER / 2, 0);
        if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, room, 4) !== 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, room, 4);
        if (bindFd(fd, name, v6 ? 28 : 16) !== 0) throw fail('bind');
        const length = Buffer.alloc(4);
        length.writeUInt32LE(SOCKADDR_BYTES, 0);
        if (getsockname(fd, name, length) !== 0) throw fail('getsockname');
        const bound = name.readUInt16BE(2);
        sockets.push({ fd, local: { address, port: bound }, v6, out: [] });
        return bound;
      } catch (error) {
        closeFd(fd);
        throw error;
      }
    },
    start() {
      if (started || closed) return;
      started = true;
      wait();
    },
    get sendErrors() {
      return sendErrors;
    },
    async close() {
      if (closed) return;
      closed = true;
      // A shut-down socket reads as ready (EOF): the poll returns, and only then is the number given back.
      for (const bound of sockets) shutdown(bound.fd, SHUT_RDWR);
      await polling;
      for (const bound of sockets.splice(0)) closeFd(bound.fd);
    },
  };
}
