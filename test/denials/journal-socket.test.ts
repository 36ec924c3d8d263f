/**
 * The journal socket never holds the daemon's thread: a journald whose
 * queue is full (here a datagram socket bound by the test and never read)
 * makes each entry EAGAIN at once, dropped and counted. What does arrive is
 * journald's native protocol, one field per NAME.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { denialJournalFields, openDenialJournal } from '../../src/denials/journal.js';
import type { DenialRecord } from '../../src/denials/record.js';
import { journalDatagram, openJournalSender } from '../../src/system/journal.js';
import { telemetryDenial } from './store-records.js';

const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
const libc = koffi.load('libc.so.6');
const socket = libc.func('socket', 'int', ['int', 'int', 'int']) as (d: number, t: number, p: number) => number;
const bind = libc.func('bind', 'int', ['int', 'void *', 'uint32_t']) as (fd: number, a: Buffer, n: number) => number;
const recv = libc.func('recv', 'intptr_t', ['int', 'void *', 'size_t', 'int']) as (fd: number, b: Buffer, n: number, f: number) => number;
const close = libc.func('close', 'int', ['int']) as (fd: number) => number;

const scratch = mkdtempSync(join(tmpdir(), 'egd-journal-socket-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** A stand-in journald: a bound datagram socket that reads only when asked. */
function listener(path: string): { read(): Buffer[]; close(): void } {
  const fd = socket(1, 2, 0);
  const address = Buffer.alloc(2 + Buffer.byteLength(path) + 1);
  address.writeUInt16LE(1, 0);
  address.write(path, 2);
  if (bind(fd, address, address.length) !== 0) throw new Error(`bind ${path}: errno ${koffi.errno()}`);
  return {
    read() {
      const out: Buffer[] = [];
      const buffer = Buffer.alloc(65536);
      for (let n = recv(fd, buffer, buffer.length, 0x40); n >= 0; n = recv(fd, buffer, buffer.length, 0x40)) out.push(Buffer.from(buffer.subarray(0, n)));
      return out;
    },
    close: () => void close(fd),
  };
}

/** journald's reading of a native datagram: NAME=value lines, or NAME, a 64-bit length and the bytes. */
function parseNative(d: Buffer): [string, string][] {
  const fields: [string, string][] = [];
  let at = 0;
  while (at < d.length) {
    const nl = d.indexOf(0x0a, at);
    const line = d.subarray(at, nl).toString('utf8');
    const eq = line.indexOf('=');
    if (eq >= 0) {
      fields.push([line.slice(0, eq), line.slice(eq + 1)]);
      at = nl + 1;
    } else {
      const length = Number(d.readBigUInt64LE(nl + 1));
      fields.push([line, d.subarray(nl + 9, nl + 9 + length).toString('utf8')]);
      expect(d[nl + 9 + length]).toBe(0x0a);
      at = nl + 10 + length;
    }
  }
  return fields;
}

const record = (i: number, over: Partial<DenialRecord> = {}): DenialRecord =>
  telemetryDenial({
    firstSeen: 1_780_000_000_000 + i,
    lastSeen: 1_780_000_000_000 + i,
    protocol: 'udp',
    address: `203.0.113.${i % 256}`,
    port: 53,
    ...over,
  });

describe('the journal socket', () => {
  it('a journald that reads nothing: every entry returns at once, the overflow is dropped and counted, what arrived is whole', () => {
    const path = join(scratch, 'full.socket');
    const journald = listener(path);
    const warned: object[] = [];
    const journal = openDenialJournal({ socket: path, log: { warn: (o: object) => warned.push(o), info: () => undefined } as never });
    try {
      expect(journal.via).toBe('journal');
      const n = 5000;
      const started = performance.now();
      for (let i = 0; i < n; i++) journal.write(record(i));
      const took = performance.now() - started;
      // A blocking send would never come back here: nothing reads the socket.
      expect(took).toBeLessThan(5000);
      expect(journal.dropped).toBeGreaterThan(0);
      const arrived = journald.read();
      expect(arrived.length + journal.dropped).toBe(n);
      // Said once, not per entry.
      expect(warned).toEqual([expect.objectContaining({ event: 'journal-behind' })]);
      // The first entries went through whole, in order.
      arrived.slice(0, 3).forEach((d, i) => expect(parseNative(d)).toEqual(denialJournalFields(record(i)).map(([k, v]) => [k, v])));
      // Room again: entries go through, and nothing more is dropped.
      const before = journal.dropped;
      journal.write(record(n));
      expect(journal.dropped).toBe(before);
      expect(journald.read()).toHaveLength(1);
    } finally {
      journal.close();
      journald.close();
    }
  });

  it('a value with a newline is one length-prefixed field, never a second (forged) one', () => {
    const fields = denialJournalFields(record(1, { app: 'evil\nEGRESSD_APP=forged' }));
    const parsed = parseNative(journalDatagram(fields));
    expect(parsed.filter(([k]) => k === 'EGRESSD_APP')).toEqual([['EGRESSD_APP', 'evil\nEGRESSD_APP=forged']]);
    expect(parsed).toEqual(fields.map(([k, v]) => [k, v]));
  });

  it('no journald at the path: each entry fails with an errno at once (the caller then writes to stdout)', () => {
    const send = openJournalSender(join(scratch, 'nobody.socket'));
    try {
      expect(send([['MESSAGE', 'x']])).toBeLessThan(0);
    } finally {
      send.close();
    }
  });
});
