/**
 * Netlink for egressd: Node has no AF_NETLINK sockets, so the socket is
 * libc's (socket/bind/sendto/recv through koffi, the FFI egressd already uses
 * for libnftables and NSS), and the framing is here, in TypeScript, apart
 * from the transport so that it can be tested on bytes alone.
 *
 * One family's requests go through one `NetlinkSocket`: sock_diag (sockets
 * of this network namespace, sock-diag.ts) today; NFLOG for the denial
 * reader later. A request is answered whole before the next is sent:
 * `request` collects every message up to the acknowledgement or the end of
 * a dump. Whatever the kernel (or a fake transport) answers, a malformed
 * answer is an EGD_NETLINK error that says what was wrong, never a crash;
 * a receive that waits longer than the socket's timeout fails the same way,
 * so nothing hangs.
 */
import { createRequire } from 'node:module';
import { EgressError, ErrorCode } from '../errors.js';

/** Netlink families (protocol argument of socket(2)). */
export const NetlinkFamily = { Route: 0, SockDiag: 4, Netfilter: 12 } as const;

/** nlmsg_flags. */
export const NlmFlag = { Request: 0x1, Multi: 0x2, Ack: 0x4, DumpIntr: 0x10, Root: 0x100, Match: 0x200, Dump: 0x300 } as const;

/** The errno a dump the kernel says was interrupted (NLM_F_DUMP_INTR) throws with: the caller dumps again. */
export const DUMP_INTERRUPTED_ERRNO = 4;

/** The control message types every family shares. */
export const NlmsgType = { Noop: 1, Error: 2, Done: 3, Overrun: 4 } as const;

export const NLMSG_HDRLEN = 16;

export interface NetlinkMessage {
  readonly type: number;
  readonly flags: number;
  readonly seq: number;
  readonly pid: number;
  /** The bytes after the header, up to the message's own length (padding left out). */
  readonly payload: Buffer;
}

/** A netlink request failed, or its answer could not be read. `errno` is the kernel's (positive) when it refused. */
export class NetlinkError extends EgressError {
  readonly errno: number | undefined;

  constructor(message: string, options: { errno?: number; cause?: unknown } = {}) {
    super(ErrorCode.Netlink, message, options.cause === undefined ? {} : { cause: options.cause });
    this.name = 'NetlinkError';
    this.errno = options.errno;
  }
}

const align = (n: number): number => (n + 3) & ~3;

/** One message: header, payload, padding to 4 bytes. */
export function encodeMessage(message: { type: number; flags: number; seq: number; pid?: number; payload?: Uint8Array }): Buffer {
  const payload = message.payload ?? new Uint8Array();
  const length = NLMSG_HDRLEN + payload.length;
  const out = Buffer.alloc(align(length));
  out.writeUInt32LE(length, 0);
  out.writeUInt16LE(message.type, 4);
  out.writeUInt16LE(message.flags, 6);
  out.writeUInt32LE(message.seq >>> 0, 8);
  out.writeUInt32LE((message.pid ?? 0) >>> 0, 12);
  out.set(payload, NLMSG_HDRLEN);
  return out;
}

/**
 * The messages of one datagram. Netlink messages are little-endian on the
 * machines egressd runs on (x86_64, arm64); a length that does not fit the
 * datagram is an error, not a short read to wait for: netlink datagrams are
 * whole.
 */
export function parseMessages(datagram: Uint8Array): NetlinkMessage[] {
  const buffer = Buffer.from(datagram.buffer, datagram.byteOffset, datagram.byteLength);
  const messages: NetlinkMessage[] = [];
  let offset = 0;
  while (offset < buffer.length) {
    const left = buffer.length - offset;
    if (left < NLMSG_HDRLEN) throw new NetlinkError(`netlink: ${left} bytes left at offset ${offset}, too short for a message header (${NLMSG_HDRLEN})`);
    const length = buffer.readUInt32LE(offset);
    if (length < NLMSG_HDRLEN || length > left)
      throw new NetlinkError(
        `netlink: a message at offset ${offset} says it is ${length} bytes long, but ${left} bytes are left (at least ${NLMSG_HDRLEN} are needed)`,
      );
    messages.push({
      type: buffer.readUInt16LE(offset + 4),
      flags: buffer.readUInt16LE(offset + 6),
      seq: buffer.readUInt32LE(offset + 8),
      pid: buffer.readUInt32LE(offset + 12),
      payload: buffer.subarray(offset + NLMSG_HDRLEN, offset + length),
    });
    // The last message's padding may be missing; never step past the datagram.
    offset = Math.min(buffer.length, offset + align(length));
  }
  return messages;
}

/** The error code of an NLMSG_ERROR message: 0 for an acknowledgement, else a negative errno. */
export function errorCodeOf(message: NetlinkMessage): number {
  if (message.payload.length < 4) throw new NetlinkError(`netlink: an error message with ${message.payload.length} bytes of payload (at least 4 are needed)`);
  return message.payload.readInt32LE(0);
}

/** Attributes (struct rtattr / nlattr: u16 length, u16 type, value, padded to 4), by type; the last one of a type wins. */
export function parseAttributes(bytes: Buffer): Map<number, Buffer> {
  const attributes = new Map<number, Buffer>();
  let offset = 0;
  while (offset + 4 <= bytes.length) {
    const length = bytes.readUInt16LE(offset);
    // Flags ride in the high bits of the type (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
    const type = bytes.readUInt16LE(offset + 2) & 0x3fff;
    if (length < 4 || offset + length > bytes.length)
      throw new NetlinkError(
        `netlink: an attribute at offset ${offset} says it is ${length} bytes long, but ${bytes.length - offset} bytes are left (at least 4 are needed)`,
      );
    attributes.set(type, bytes.subarray(offset + 4, offset + length));
    offset += align(length);
  }
  if (offset < bytes.length) throw new NetlinkError(`netlink: ${bytes.length - offset} stray bytes after the last attribute`);
  return attributes;
}

/** Sends and receives whole datagrams; `receive` throws a NetlinkError when nothing comes within its timeout. */
export interface NetlinkTransport {
  send(datagram: Buffer): void;
  receive(): Buffer;
  close(): void;
}

/**
 * The same socket for a listener that must never block the event loop (the
 * denial reader): `waitReadable` runs poll(2) on libuv's thread pool, and
 * `receiveNow` drains what is queued without waiting (MSG_DONTWAIT), on the
 * calling thread, so errno is read where it was set. A socket that
 * overflowed makes `receiveNow` throw a NetlinkError with errno ENOBUFS once.
 */
export interface ListeningNetlinkTransport extends NetlinkTransport {
  /** True when a datagram (or an error) is waiting; false after `timeoutMs`. Only one wait at a time. */
  waitReadable(timeoutMs: number): Promise<boolean>;
  /** The next queued datagram, or undefined when none is. Not a copy: valid until the next receive (a flood's reader parses it at once and keeps nothing of it). */
  receiveNow(): Buffer | undefined;
}

/** How long one receive may wait for the kernel before the request fails. */
export const DEFAULT_RECEIVE_TIMEOUT_MS = 5000;

/**
 * A netlink socket of one family. `request` sends one message and returns
 * the answers to it: for a dump every message before NLMSG_DONE, for a
 * request with NLM_F_ACK nothing but the acknowledgement (an empty list). A
 * refusal (NLMSG_ERROR with an errno) throws a NetlinkError carrying it.
 */
export class NetlinkSocket {
  private seq: number;
  private closed = false;

  constructor(
    private readonly transport: NetlinkTransport,
    /** Where sequence numbers start; answers are matched on them. */
    firstSeq = Math.floor(Date.now() / 1000),
  ) {
    this.seq = firstSeq >>> 0;
  }

  request(type: number, flags: number, payload: Uint8Array): NetlinkMessage[] {
    if (this.closed) throw new NetlinkError('netlink: the socket is closed');
    const seq = (this.seq = (this.seq + 1) >>> 0);
    this.transport.send(encodeMessage({ type, flags: flags | NlmFlag.Request, seq, payload }));
    const dump = (flags & NlmFlag.Dump) === NlmFlag.Dump;
    const answers: NetlinkMessage[] = [];
    let interrupted = false;
    for (;;) {
      for (const message of parseMessages(this.transport.receive())) {
        // Left over from an earlier request that failed half-way: not an answer to this one.
        if (message.seq !== seq) continue;
        if (message.type === NlmsgType.Error) {
          const code = errorCodeOf(message);
          if (code === 0 && !dump) return answers;
          if (code === 0) continue;
          throw new NetlinkError(`netlink: the kernel refused message type ${type}: ${errnoName(-code)}`, { errno: -code });
        }
        if (message.type === NlmsgType.Done) {
          // A dump that failed part-way says so in NLMSG_DONE's payload.
          const code = message.payload.length >= 4 ? message.payload.readInt32LE(0) : 0;
          if (code < 0) throw new NetlinkError(`netlink: the dump of message type ${type} failed: ${errnoName(-code)}`, { errno: -code });
          // What was dumped changed while it was (a generation swap): the answers are a mix of before and after. The kernel
          // may flag NLMSG_DONE itself (netlink_dump_done); nf_tables' set-element dumps flag nothing, which
          // listTable's names compared before and after stand in for.
          if (interrupted || (message.flags & NlmFlag.DumpIntr) !== 0)
            throw new NetlinkError(`netlink: the dump of message type ${type} was interrupted by a change`, { errno: DUMP_INTERRUPTED_ERRNO });
          return answers;
        }
        if (message.type === NlmsgType.Overrun) throw new NetlinkError('netlink: the kernel reports an overrun; answers were lost');
        if (message.type === NlmsgType.Noop) continue;
        if ((message.flags & NlmFlag.DumpIntr) !== 0) interrupted = true;
        answers.push(message);
        if (!dump && (message.flags & NlmFlag.Multi) === 0 && (flags & NlmFlag.Ack) === 0) return answers;
      }
    }
  }

  /**
   * Several requests that are not dumps, in one datagram (the kernel takes
   * them in order, each on its own): the answers to each, or the
   * NetlinkError it was refused with, in the order asked. For requests
   * answered by exactly one message or an error (an exact sock_diag
   * lookup): one system call out instead of one per request.
   */
  requestEach(requests: readonly { type: number; flags: number; payload: Uint8Array }[]): (NetlinkMessage[] | NetlinkError)[] {
    if (this.closed) throw new NetlinkError('netlink: the socket is closed');
    if (requests.length === 0) return [];
    const first = (this.seq + 1) >>> 0;
    const datagram = Buffer.concat(
      requests.map((r) => {
        if ((r.flags & NlmFlag.Dump) === NlmFlag.Dump) throw new NetlinkError('netlink: a dump cannot share a datagram');
        return encodeMessage({ type: r.type, flags: r.flags | NlmFlag.Request, seq: (this.seq = (this.seq + 1) >>> 0), payload: r.payload });
      }),
    );
    this.transport.send(datagram);
    const results: (NetlinkMessage[] | NetlinkError | undefined)[] = requests.map(() => undefined);
    const answers: NetlinkMessage[][] = requests.map(() => []);
    let open = requests.length;
    while (open > 0) {
      for (const message of parseMessages(this.transport.receive())) {
        const index = (message.seq - first) >>> 0;
        const request = requests[index];
        // Left over from an earlier request that failed half-way, or one already answered: not an answer to these.
        if (request === undefined || results[index] !== undefined) continue;
        const done = (result: NetlinkMessage[] | NetlinkError): void => {
          results[index] = result;
          open--;
        };
        if (message.type === NlmsgType.Error) {
          const code = errorCodeOf(message);
          done(
            code === 0 ? answers[index]! : new NetlinkError(`netlink: the kernel refused message type ${request.type}: ${errnoName(-code)}`, { errno: -code }),
          );
          continue;
        }
        if (message.type === NlmsgType.Overrun) throw new NetlinkError('netlink: the kernel reports an overrun; answers were lost');
        if (message.type === NlmsgType.Noop || message.type === NlmsgType.Done) continue;
        answers[index]!.push(message);
        if ((message.flags & NlmFlag.Multi) === 0 && (request.flags & NlmFlag.Ack) === 0) done(answers[index]!);
      }
    }
    return results as (NetlinkMessage[] | NetlinkError)[];
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.transport.close();
  }
}

/** errno names as koffi knows them, for messages people read; callers match on the number. */
let errnoNames: Map<number, string> | undefined;
export function errnoName(errno: number): string {
  errnoNames ??= loadErrnoNames();
  return errnoNames.get(errno) ?? `errno ${errno}`;
}

function loadErrnoNames(): Map<number, string> {
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    return new Map(Object.entries(koffi.os.errno).map(([name, value]) => [value, name]));
  } catch {
    return new Map();
  }
}

const AF_NETLINK = 16;
const SOCK_RAW = 3;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
/** SO_RCVTIMEO with a 64-bit struct timeval (x86_64, arm64). */
const SO_RCVTIMEO = 20;
const SO_SNDBUF = 7;
const SO_SNDBUFFORCE = 32;
const SOL_NETLINK = 270;
const NETLINK_CAP_ACK = 10;
const NETLINK_EXT_ACK = 11;
const MSG_TRUNC = 0x20;
const MSG_DONTWAIT = 0x40;
const SO_RCVBUF = 8;
const SO_RCVBUFFORCE = 33;
/** A dump's datagrams are at most 32 KiB (netlink_dump); larger would be cut, which MSG_TRUNC reveals. */
const RECEIVE_BUFFER = 64 * 1024;

/**
 * A netlink socket of `family` through libc, in the network namespace of
 * the calling process. Blocking, with a receive timeout: a request is
 * answered in microseconds to milliseconds, and a timeout bounds a kernel
 * that does not answer.
 */
export function openNetlink(family: number, options: { receiveTimeoutMs?: number } = {}): NetlinkSocket {
  return new NetlinkSocket(openNetlinkTransport(family, options));
}

export interface NetlinkTransportOptions {
  readonly receiveTimeoutMs?: number;
  /**
   * Error messages carry the kernel's extended acknowledgement (which
   * attribute it refused, and why) and only the header of the refused
   * message, not the whole of it (NETLINK_EXT_ACK, NETLINK_CAP_ACK).
   */
  readonly extendedAck?: boolean;
  /**
   * A datagram may be this large: the kernel refuses a send larger than the
   * socket's send buffer (EMSGSIZE), and an nfnetlink batch must be one
   * datagram. Raised past the system's cap where CAP_NET_ADMIN allows.
   */
  readonly sendBufferBytes?: number;
  /** The socket's receive buffer (SO_RCVBUFFORCE past the system's cap where CAP_NET_ADMIN allows, else SO_RCVBUF up to it). */
  readonly receiveBufferBytes?: number;
  /** The largest datagram a receive takes whole (default 64 KiB). */
  readonly datagramBytes?: number;
}

/** The same socket as `openNetlink`'s, for callers that frame their own exchanges (a batch of several messages, say). */
export function openNetlinkTransport(family: number, options: NetlinkTransportOptions = {}): ListeningNetlinkTransport {
  let koffi: typeof import('koffi');
  try {
    // Loaded here, not imported at the top: a koffi without a build for this platform is an error of this call, not of every importer.
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  } catch (cause) {
    throw new NetlinkError(`netlink: koffi cannot be loaded: ${(cause as Error).message}`, { cause });
  }
  const libc = koffi.load('libc.so.6');
  const socket = libc.func('socket', 'int', ['int', 'int', 'int']) as (domain: number, type: number, protocol: number) => number;
  const bind = libc.func('bind', 'int', ['int', 'void *', 'uint32_t']) as (fd: number, addr: Buffer, length: number) => number;
  const setsockopt = libc.func('setsockopt', 'int', ['int', 'int', 'int', 'void *', 'uint32_t']) as (
    fd: number,
    level: number,
    name: number,
    value: Buffer,
    length: number,
  ) => number;
  const sendto = libc.func('sendto', 'intptr_t', ['int', 'void *', 'size_t', 'int', 'void *', 'uint32_t']) as (
    fd: number,
    buffer: Buffer,
    length: number,
    flags: number,
    addr: Buffer,
    addrLength: number,
  ) => number;
  const recv = libc.func('recv', 'intptr_t', ['int', 'void *', 'size_t', 'int']) as (fd: number, buffer: Buffer, length: number, flags: number) => number;
  const close = libc.func('close', 'int', ['int']) as (fd: number) => number;
  const poll = libc.func('poll', 'int', ['void *', 'uint64_t', 'int']);
  const { EINTR, EAGAIN } = koffi.os.errno;
  const failed = (what: string): NetlinkError => {
    const errno = koffi.errno();
    return new NetlinkError(`netlink: ${what} failed: ${errnoName(errno)}`, { errno });
  };

  const fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, family);
  if (fd < 0) throw failed(`socket(AF_NETLINK, ${family})`);
  // struct sockaddr_nl: the kernel, no multicast groups; port id chosen by the kernel.
  const kernel = Buffer.alloc(12);
  kernel.writeUInt16LE(AF_NETLINK, 0);
  try {
    if (bind(fd, kernel, kernel.length) !== 0) throw failed('bind');
    const timeoutMs = options.receiveTimeoutMs ?? DEFAULT_RECEIVE_TIMEOUT_MS;
    const timeval = Buffer.alloc(16);
    timeval.writeBigInt64LE(BigInt(Math.floor(timeoutMs / 1000)), 0);
    timeval.writeBigInt64LE(BigInt((timeoutMs % 1000) * 1000), 8);
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, timeval, timeval.length) !== 0) throw failed('setsockopt(SO_RCVTIMEO)');
    const int = (value: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeInt32LE(value, 0);
      return b;
    };
    if (options.extendedAck === true) {
      if (setsockopt(fd, SOL_NETLINK, NETLINK_EXT_ACK, int(1), 4) !== 0) throw failed('setsockopt(NETLINK_EXT_ACK)');
      if (setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, int(1), 4) !== 0) throw failed('setsockopt(NETLINK_CAP_ACK)');
    }
    if (options.sendBufferBytes !== undefined) {
      // The kernel doubles what it is given (socket(7)); FORCE needs CAP_NET_ADMIN, without it the system's cap applies.
      const half = int(Math.ceil(options.sendBufferBytes / 2));
      if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, half, 4) !== 0 && setsockopt(fd, SOL_SOCKET, SO_SNDBUF, half, 4) !== 0)
        throw failed('setsockopt(SO_SNDBUF)');
    }
    if (options.receiveBufferBytes !== undefined) {
      const half = int(Math.ceil(options.receiveBufferBytes / 2));
      if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, half, 4) !== 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUF, half, 4) !== 0)
        throw failed('setsockopt(SO_RCVBUF)');
    }
  } catch (error) {
    close(fd);
    throw error;
  }
  const buffer = Buffer.alloc(options.datagramBytes ?? RECEIVE_BUFFER);
  let open = true;
  const pollfd = Buffer.alloc(8);
  let waiting: Promise<boolean> | undefined;
  return {
    send(datagram) {
      for (;;) {
        if (sendto(fd, datagram, datagram.length, 0, kernel, kernel.length) >= 0) return;
        if (koffi.errno() !== EINTR) throw failed('sendto');
      }
    },
    receive() {
      for (;;) {
        const length = recv(fd, buffer, buffer.length, MSG_TRUNC);
        if (length < 0) {
          const errno = koffi.errno();
          if (errno === EINTR) continue;
          if (errno === EAGAIN)
            throw new NetlinkError(`netlink: no answer from the kernel within ${options.receiveTimeoutMs ?? DEFAULT_RECEIVE_TIMEOUT_MS} ms`, { errno });
          throw new NetlinkError(`netlink: recv failed: ${errnoName(errno)}`, { errno });
        }
        if (length > buffer.length) throw new NetlinkError(`netlink: a datagram of ${length} bytes, larger than the ${buffer.length}-byte buffer, was cut`);
        // A copy: the buffer is reused for the next datagram while answers may still point into this one.
        return Buffer.from(buffer.subarray(0, length));
      }
    },
    waitReadable(timeoutMs) {
      if (!open) return Promise.reject(new NetlinkError('netlink: the socket is closed'));
      if (waiting) return Promise.reject(new NetlinkError('netlink: a wait is already in progress'));
      // struct pollfd { int fd; short events = POLLIN; short revents; }
      pollfd.writeInt32LE(fd, 0);
      pollfd.writeInt16LE(1, 4);
      pollfd.writeInt16LE(0, 6);
      const wait = new Promise<boolean>((resolve, reject) => {
        poll.async(pollfd, 1, timeoutMs, (error: unknown, ready: number) => {
          waiting = undefined;
          if (error) reject(new NetlinkError(`netlink: poll failed: ${error instanceof Error ? error.message : 'koffi error'}`, { cause: error }));
          // -1 is EINTR at worst here (the fd is ours and valid): the caller simply waits again.
          else resolve(ready > 0);
        });
      });
      waiting = wait;
      return wait;
    },
    receiveNow() {
      if (!open) throw new NetlinkError('netlink: the socket is closed');
      for (;;) {
        const length = recv(fd, buffer, buffer.length, MSG_TRUNC | MSG_DONTWAIT);
        if (length < 0) {
          const errno = koffi.errno();
          if (errno === EINTR) continue;
          if (errno === EAGAIN) return undefined;
          throw new NetlinkError(`netlink: recv failed: ${errnoName(errno)}`, { errno });
        }
        if (length > buffer.length) throw new NetlinkError(`netlink: a datagram of ${length} bytes, larger than the ${buffer.length}-byte buffer, was cut`);
        return buffer.subarray(0, length);
      }
    },
    close() {
      // A poll in flight on the thread pool still holds the fd: closed once it returns, so the number is never reused under it.
      if (open && waiting) void waiting.finally(() => close(fd)).catch(() => undefined);
      else if (open) close(fd);
      open = false;
    },
  };
}
