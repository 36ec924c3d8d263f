/**
 * Structured entries for the systemd journal, through libsystemd's own
 * `sd_journal_sendv` (koffi): journald keeps each `KEY=value` as a field of
 * its own, which a JSON line on stdout never becomes (journald keeps stdout
 * as MESSAGE only). Fields are sent as iovecs, so a value may hold any byte
 * but NUL; libsystemd picks the binary-safe form for one with a newline.
 *
 * Loaded at the first entry, like sd-notify.ts: where there is no journal
 * socket the caller writes elsewhere and libsystemd is never opened.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { EgressError, ErrorCode } from '../errors.js';
import { LIBSYSTEMD } from './sd-notify.js';

/** Where journald listens for native entries (sd_journal_sendv writes here). */
export const JOURNAL_SOCKET = '/run/systemd/journal/socket';

/** One entry: field names are upper case letters, digits and "_", not starting with "_" (journald reserves those). */
export type JournalFields = readonly (readonly [string, string])[];

/** Sends one entry; returns what sd_journal_sendv returned (0 sent, < 0 -errno). */
export type SendJournal = (fields: JournalFields) => number;

const FIELD_NAME = /^[A-Z0-9][A-Z0-9_]{0,63}$/;

/** The bytes of each field, `NAME=value`; a NUL in a value (never sent by egressd, but names come from the network) becomes U+FFFD. */
export function journalIovecs(fields: JournalFields): Buffer[] {
  return fields.map(([name, value]) => {
    if (!FIELD_NAME.test(name)) throw new EgressError(ErrorCode.Io, `journal: "${name}" is not a journal field name`);
    return Buffer.from(`${name}=${value.replace(/\0/g, '\uFFFD')}`, 'utf8');
  });
}

/** libsystemd's sd_journal_sendv, bound through koffi. Throws EGD_IO when koffi or the library cannot be loaded. */
export function loadSdJournal(path: string = LIBSYSTEMD): SendJournal {
  let koffi: typeof import('koffi');
  try {
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const lib = koffi.load(path);
    const iovec = koffi.struct('egressd_iovec', { iov_base: 'void *', iov_len: 'size_t' });
    const sendv = lib.func('sd_journal_sendv', 'int', [koffi.pointer(iovec), 'int']) as (iov: unknown, n: number) => number;
    return (fields) => {
      const buffers = journalIovecs(fields);
      // koffi copies the array of structs in; each Buffer's memory stays put for the call.
      return sendv(
        buffers.map((b) => ({ iov_base: b, iov_len: b.length })),
        buffers.length,
      );
    };
  } catch (cause) {
    throw new EgressError(ErrorCode.Io, `sd_journal_sendv: cannot load ${path}: ${(cause as Error).message}`, { cause });
  }
}

/** True when journald listens here (a service under systemd; not a container without it, nor this test machine). */
export function journalAvailable(socket: string = JOURNAL_SOCKET): boolean {
  return existsSync(socket);
}
