/**
 * Sockets that carry a meta mark (SO_MARK) on every packet they send, from
 * the first: the table lets only packets with the resolver's mark leave for
 * port 53 and 853. Node cannot set SO_MARK, and a mark set after connect()
 * misses the SYN, so the file descriptor is made through libc (koffi) with
 * the mark already on it and handed to Node, which adopts it through its
 * public API (`bind({ fd })` for dgram, `new net.Socket({ fd })` for TCP).
 * Setting SO_MARK needs CAP_NET_ADMIN (since Linux 5.17 CAP_NET_RAW does
 * too); without either, opening a marker throws a ResolverStartError with
 * reason 'mark'.
 */
import dgram from 'node:dgram';
import { createRequire } from 'node:module';
import net from 'node:net';
import { ResolverStartError } from '../errors.js';

const AF_INET = 2;
const AF_INET6 = 10;
const SOCK_STREAM = 1;
const SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const SOL_SOCKET = 1;
const SO_MARK = 36;

export type Family = 4 | 6;

/** Makes marked sockets; one per resolver, bound to libc once. */
export interface SocketMarker {
  readonly mark: number;
  /** An unbound UDP socket whose packets carry the mark; the kernel picks a random source port at the first send. */
  udp(family: Family): dgram.Socket;
  /** An unconnected TCP socket whose packets (SYN included) carry the mark; call `connect` on it. */
  tcp(family: Family): net.Socket;
}

interface Libc {
  socket(domain: number, type: number, protocol: number): number;
  setsockopt(fd: number, level: number, name: number, value: Buffer, length: number): number;
  close(fd: number): number;
  errno(): number;
  errnoName(errno: number): string;
}

function loadLibc(): Libc {
  let koffi: typeof import('koffi');
  try {
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
  } catch (cause) {
    throw new ResolverStartError('mark', `socket mark: koffi cannot be loaded, so SO_MARK cannot be set: ${(cause as Error).message}`, { cause });
  }
  const libc = koffi.load('libc.so.6');
  const names = new Map(Object.entries(koffi.os.errno).map(([name, value]) => [value, name]));
  return {
    socket: libc.func('int socket(int, int, int)') as Libc['socket'],
    setsockopt: libc.func('int setsockopt(int, int, int, void *, uint32_t)') as Libc['setsockopt'],
    close: libc.func('int close(int)') as Libc['close'],
    errno: () => koffi.errno(),
    errnoName: (errno) => names.get(errno) ?? `errno ${errno}`,
  };
}

/**
 * A marker for `mark` (a u32, not 0). Tries the mark once at once, so that a
 * process without CAP_NET_ADMIN fails here, at start, with a clear error,
 * rather than at its first upstream query.
 */
export function openSocketMarker(mark: number): SocketMarker {
  if (!Number.isInteger(mark) || mark <= 0 || mark > 0xffffffff)
    throw new ResolverStartError('mark', `socket mark: ${mark} is not a mark (an integer from 1 to 0xffffffff)`);
  const libc = loadLibc();
  const value = Buffer.alloc(4);
  value.writeUInt32LE(mark >>> 0, 0);
  const markedFd = (family: Family, type: number): number => {
    const fd = libc.socket(family === 4 ? AF_INET : AF_INET6, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) throw new ResolverStartError('mark', `socket mark: socket() failed: ${libc.errnoName(libc.errno())}`);
    if (libc.setsockopt(fd, SOL_SOCKET, SO_MARK, value, 4) !== 0) {
      const errno = libc.errnoName(libc.errno());
      libc.close(fd);
      throw new ResolverStartError(
        'mark',
        `socket mark: setting SO_MARK 0x${mark.toString(16)} failed (${errno}); it needs CAP_NET_ADMIN (or, since Linux 5.17, CAP_NET_RAW)`,
        {
          details: ['run the resolver with CAP_NET_ADMIN so that its upstream queries pass the table'],
        },
      );
    }
    return fd;
  };
  libc.close(markedFd(4, SOCK_DGRAM));
  return {
    mark,
    udp(family) {
      const fd = markedFd(family, SOCK_DGRAM);
      const socket = dgram.createSocket(family === 4 ? 'udp4' : 'udp6');
      // Adopts the descriptor: from here Node closes it with the socket.
      socket.bind({ fd });
      return socket;
    },
    tcp(family) {
      return new net.Socket({ fd: markedFd(family, SOCK_STREAM), readable: true, writable: true });
    },
  };
}
