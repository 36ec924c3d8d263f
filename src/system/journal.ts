/**
 * Structured entries for the systemd journal, in journald's native
 * protocol (systemd's JOURNAL_NATIVE_PROTOCOL: one datagram per entry,
 * `NAME=value\n` per field, or `NAME\n`, a 64-bit little-endian length and
 * the bytes for a value with a newline), sent on a socket of our own:
 * journald keeps each `KEY=value` as a field of its own, which a JSON line
 * on stdout never becomes.
 *
 * Not libsystemd's sd_journal_sendv: its socket blocks, and a journald that
 * falls behind (a flood of denials is exactly when it does) would hold the
 * daemon's one thread, the resolver's too, on every entry. This socket is
 * SOCK_NONBLOCK: a full journald queue is EAGAIN at once, and the caller
 * counts the entry as dropped (the record itself is in the store).
 *
 * Opened at the first entry, like sd-notify.ts: where there is no journal
 * socket the caller writes elsewhere and no socket is made.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { EgressError, ErrorCode } from '../errors.js';

/** Where journald listens for native entries. */
export const JOURNAL_SOCKET = '/run/systemd/journal/socket';

/** One entry: field names are upper case letters, digits and "_", not starting with "_" (journald reserves those). */
export type JournalFields = readonly (readonly [string, string])[];

/** Sends one entry; returns 0 when sent, else -errno (-EAGAIN: journald's queue is full, nothing waited). */
export type SendJournal = (fields: JournalFields) => number;

const FIELD_NAME = /^[A-Z0-9][A-Z0-9_]{0,63}$/;

/** One entry as journald's native protocol has it; a NUL in a value (never sent by egressd, but names come from the network) becomes U+FFFD. */
export function journalDatagram(fields: JournalFields): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of fields) {
    if (!FIELD_NAME.test(name)) throw new EgressError(ErrorCode.Io, `journal: "${name}" is not a journal field name`);
    const bytes = Buffer.from(value.replace(/\0/g, '\uFFFD'), 'utf8');
    if (!bytes.includes(0x0a)) {
      parts.push(Buffer.from(`${name}=`, 'utf8'), bytes, NEWLINE);
      continue;
    }
    // A value with a newline goes length-prefixed: it stays one field, never a second, forged one.
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(bytes.length));
    parts.push(Buffer.from(`${name}\n`, 'utf8'), length, bytes, NEWLINE);
  }
  return Buffer.concat(parts);
}
const NEWLINE = Buffer.from('\n');

const AF_UNIX = 1;
const SOCK_DGRAM = 2;
const SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
const MSG_NOSIGNAL = 0x4000;
/** sizeof(sockaddr_un.sun_path) */
const SUN_PATH = 108;

/**
 * A non-blocking datagram socket to journald at `socket` (libc's socket and
 * sendto through koffi). Throws EGD_IO when koffi cannot be loaded or the
 * socket cannot be made. Each send resolves the path again, so a journald
 * that restarted is found without reopening.
 */
export function openJournalSender(socket: string = JOURNAL_SOCKET): SendJournal & { close(): void } {
  const path = Buffer.from(socket, 'utf8');
  if (path.length >= SUN_PATH) throw new EgressError(ErrorCode.Io, `journal: socket path too long: ${socket}`);
  let koffi: typeof import('koffi');
  let fd: number;
  let sendto: (fd: number, buffer: Buffer, length: number, flags: number, address: Buffer, addressLength: number) => number;
  let close: (fd: number) => number;
  try {
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const libc = koffi.load('libc.so.6');
    const socketCall = libc.func('socket', 'int', ['int', 'int', 'int']) as (domain: number, type: number, protocol: number) => number;
    sendto = libc.func('sendto', 'intptr_t', ['int', 'void *', 'size_t', 'int', 'void *', 'uint32_t']) as typeof sendto;
    close = libc.func('close', 'int', ['int']) as typeof close;
    fd = socketCall(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  } catch (cause) {
    throw new EgressError(ErrorCode.Io, `journal: koffi or libc cannot be loaded: ${(cause as Error).message}`, { cause });
  }
  if (fd < 0) throw new EgressError(ErrorCode.Io, `journal: socket(AF_UNIX, SOCK_DGRAM): errno ${koffi.errno()}`);
  const address = Buffer.alloc(2 + path.length + 1);
  address.writeUInt16LE(AF_UNIX, 0);
  path.copy(address, 2);
  let open = true;
  const send = (fields: JournalFields): number => {
    if (!open) return -EBADF;
    const datagram = journalDatagram(fields);
    const sent = sendto(fd, datagram, datagram.length, MSG_NOSIGNAL, address, address.length);
    return sent < 0 ? -koffi.errno() : 0;
  };
  return Object.assign(send, {
    close() {
      if (open) close(fd);
      open = false;
    },
  });
}
const EBADF = 9;

/** True when journald listens here (a service under systemd; not a container without it, nor this test machine). */
export function journalAvailable(socket: string = JOURNAL_SOCKET): boolean {
  return existsSync(socket);
}
