/**
 * Subordinate ids: /etc/subuid and /etc/subgid, the ranges `newuidmap` and
 * `newgidmap` let a user map into a user namespace of its own (rootless
 * containers). A process there sends with the subordinate uid, so the
 * ranges belong to their owner's identity. Lines are `owner:start:count`,
 * the owner a user name or a uid; /etc/subgid's owners are users too.
 */
import { readFileSync } from 'node:fs';
import type { PolicyIssue } from '../policy/issues.js';

/** uids and gids run to 2^32 - 2: (uid_t)-1 is "no id" and never mapped. */
const MAX_ID = 0xfffffffe;

/** One line of a subordinate-id file: the ids `from` to `to` (inclusive) belong to `owner`. */
export interface SubordinateLine {
  readonly owner: string;
  /** Its line number in its file (from 1). */
  readonly line: number;
  readonly from: number;
  readonly to: number;
}

/** A line newuidmap does not read: it gives no range, and it names `owner` (the text before its first colon). */
export interface RefusedLine {
  readonly owner: string;
  readonly line: number;
  readonly why: string;
}

/** shadow's subid lines are read into a 1024-byte buffer: a longer one is refused. */
const MAX_LINE_BYTES = 1023;
const ULONG_MAX = 2n ** 64n - 1n;

/**
 * Parses one file exactly as shadow 4.13 (Debian 12's newuidmap and
 * newgidmap, lib/subordinateio.c and lib/getulong.c) reads it, checked
 * against the real newuidmap: the owner is the text before the first colon,
 * nothing trimmed; start and count are what strtoul(…, 0) reads — leading
 * blanks, a sign, 0x hexadecimal, 0 octal — with nothing after them, as a
 * 64-bit unsigned value; a fourth field and what follows are ignored; a
 * line starting with + or - (NIS) is never read. A range covers start to
 * start + count - 1 in that 64-bit arithmetic, wrapping: a count of 0 at
 * start 0 covers every id, as newuidmap lets it map. Only ids a process
 * can have (to 2^32 - 2) are kept.
 *
 * A line newuidmap refuses gives no range and comes back in `refused` (and
 * as a warning at file:line): the caller fails closed where it names a user
 * the policy confines. Blank lines and refused `#` comments are skipped
 * silently; a line that is read but covers no id is a warning.
 */
export function parseSubordinate(text: string, file: string): { lines: SubordinateLine[]; refused: RefusedLine[]; warnings: PolicyIssue[] } {
  const lines: SubordinateLine[] = [];
  const refused: RefusedLine[] = [];
  const warnings: PolicyIssue[] = [];
  const warn = (line: number, message: string) => warnings.push({ severity: 'warning', at: { file, line, col: 1 }, message });
  const rows = text.split('\n');
  // A final newline ends the last line; it does not start another.
  if (rows[rows.length - 1] === '') rows.pop();
  rows.forEach((row, index) => {
    const number = index + 1;
    if (row === '') return;
    const read = readLine(row);
    if ('why' in read) {
      if (row.startsWith('#')) return;
      refused.push({ owner: row.split(':')[0]!, line: number, why: read.why });
      warn(number, `subordinate id line skipped: ${read.why}`);
      return;
    }
    // Wrapping as C's unsigned long does: a range whose end wraps below its start covers nothing.
    const last = (read.start + read.count - 1n) & ULONG_MAX;
    if (last < read.start || read.start > BigInt(MAX_ID)) {
      warn(number, 'subordinate id line covers no id a process can have');
      return;
    }
    // newuidmap lets the owner map these ids, root's included: its identity holds them, and what confines it confines them.
    if (read.start === 0n)
      warn(number, `subordinate ids of ${JSON.stringify(read.owner)} include 0: it can map root into its user namespaces, so its identity holds uid 0 too`);
    lines.push({ owner: read.owner, line: number, from: Number(read.start), to: Number(last > BigInt(MAX_ID) ? BigInt(MAX_ID) : last) });
  });
  return { lines, refused, warnings };
}

/** One line as subordinate_parse reads it, or why it refuses it. */
function readLine(row: string): { owner: string; start: bigint; count: bigint } | { why: string } {
  if (row.startsWith('+') || row.startsWith('-')) return { why: 'a NIS line (+ or - first)' };
  if (Buffer.byteLength(row) > MAX_LINE_BYTES) return { why: `longer than ${MAX_LINE_BYTES} bytes` };
  const fields = row.split(':');
  if (fields.length < 3) return { why: `${fields.length} field${fields.length === 1 ? '' : 's'}, not 3 (owner:start:count)` };
  const [owner = '', start = '', count = ''] = fields;
  if (owner === '') return { why: 'no owner' };
  if (start === '' || count === '') return { why: `no ${start === '' ? 'start' : 'count'}` };
  const from = strtoul(start);
  if (from === undefined) return { why: `start ${JSON.stringify(start)} is not a number` };
  const length = strtoul(count);
  if (length === undefined) return { why: `count ${JSON.stringify(count)} is not a number` };
  return { owner, start: from, count: length };
}

/**
 * A whole field as glibc's strtoul(s, &end, 0) reads it when getulong
 * takes it (the field must end where the number does, no ERANGE), or
 * undefined: blanks first, an optional sign (a minus negates modulo 2^64),
 * then 0x or 0X and hex digits, 0 and octal digits, or decimal digits.
 */
export function strtoul(field: string): bigint | undefined {
  const match = /^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)$/.exec(field);
  if (!match) return undefined;
  const digits = match[2]!;
  const value = /^0[xX]/.test(digits) ? BigInt(digits) : digits.length > 1 && digits.startsWith('0') ? BigInt(`0o${digits.slice(1)}`) : BigInt(digits);
  if (value > ULONG_MAX) return undefined;
  return match[1] === '-' ? (ULONG_MAX + 1n - value) & ULONG_MAX : value;
}

/** What a file gave: its ranges and the lines newuidmap refuses. */
export interface SubordinateFile {
  readonly file: string;
  readonly lines: readonly SubordinateLine[];
  readonly refused: readonly RefusedLine[];
}

type UidOf = (name: string) => number | undefined | { readonly error: string };

/**
 * Whether an owner field is the user, as newuidmap decides it: its name, its
 * uid as "%lu" prints it ("01000" is not uid 1000), or another name of the
 * same uid (`uidOf` looks it up; undefined for none). A lookup that failed
 * comes back as that failure: the line may be the user's.
 */
function ownerIs(owner: string, user: { name: string | undefined; uid: number }, uidOf: UidOf): boolean | { error: string } {
  if (owner === user.name || owner === String(user.uid)) return true;
  const uid = uidOf(owner);
  return typeof uid === 'object' ? { error: uid.error } : uid === user.uid;
}

/**
 * The lines of a user, as shadow's newuidmap finds them (`ownerIs`). Fails
 * closed, naming file:line: where an owner that may be the user cannot be
 * looked up, and where a line newuidmap refuses names the user (by name, by
 * uid in any decimal form, by another name of its uid) — what that line was
 * meant to give it is not known, and a range left out would be let out.
 */
export function linesOf(
  parsed: SubordinateFile,
  user: { name: string | undefined; uid: number },
  uidOf: UidOf,
): SubordinateLine[] | { error: string; refused?: RefusedLine } {
  const own: SubordinateLine[] = [];
  for (const line of parsed.lines) {
    const is = ownerIs(line.owner, user, uidOf);
    if (typeof is === 'object') return { error: `${parsed.file}:${line.line}: the owner ${line.owner} cannot be looked up: ${is.error}` };
    if (is) own.push(line);
  }
  for (const line of parsed.refused) {
    const is = (/^\d+$/.test(line.owner) && Number(line.owner) === user.uid) || ownerIs(line.owner, user, uidOf);
    if (typeof is === 'object')
      return {
        error: `${parsed.file}:${line.line}: a line newuidmap does not read (${line.why}), and its owner ${line.owner} cannot be looked up: ${is.error}`,
      };
    if (is) return { error: `${parsed.file}:${line.line}: a line of this user that newuidmap does not read: ${line.why}`, refused: line };
  }
  return own;
}

/** Where subordinate uids are read from, and how often. */
export interface SubordinateOwnersOptions {
  /** Default /etc/subuid. */
  readonly file?: string;
  /** The file is read again once what was read is this old (ms). */
  readonly maxAgeMs: number;
  readonly now: () => number;
}

/**
 * The owner field (a user name or a uid, as written) of the subordinate
 * range `uid` lies in, or undefined for a uid in none: for bounds that a
 * user's subordinate uids must not multiply. Read on demand, at most once
 * per `maxAgeMs`, so a range given or taken away counts within that time
 * without a watch; a file that cannot be read gives no range (each uid then
 * counts alone).
 */
export function subordinateOwners(options: SubordinateOwnersOptions): (uid: number) => string | undefined {
  const file = options.file ?? '/etc/subuid';
  let read: { lines: readonly SubordinateLine[]; at: number } | undefined;
  return (uid) => {
    const t = options.now();
    // A clock set back counts as old too.
    if (!read || !(t - read.at >= 0 && t - read.at < options.maxAgeMs)) read = { lines: readSubordinateLines(file), at: t };
    return ownerIn(read.lines, uid);
  };
}

/** A subordinate file's lines as newuidmap takes them; none when it cannot be read (each uid then counts alone). */
export function readSubordinateLines(file: string): readonly SubordinateLine[] {
  try {
    return parseSubordinate(readFileSync(file, 'utf8'), file).lines;
  } catch {
    return [];
  }
}

/** The owner field of the range `uid` lies in, or undefined for a uid in none. */
export function ownerIn(lines: readonly SubordinateLine[], uid: number): string | undefined {
  return lines.find((l) => uid >= l.from && uid <= l.to)?.owner;
}
