/**
 * The denial store: every record the reader makes, kept in one SQLite
 * database under the state directory (`denials/denials.sqlite`) for
 * `egressctl denials`, D-Bus queries and allow-from-alert. This file is
 * the database, synchronous; egressd runs it in a worker thread
 * (store-worker.ts, store-thread.ts), never on the thread that reads NFLOG
 * and answers DNS.
 *
 * - Writes are batched: `add` returns at once and rows are written in one
 *   transaction every `flushIntervalMs` (default 1 s), or as soon as
 *   `batchSize` (default 1000) are waiting. A SIGKILL therefore loses at most
 *   the records added in the last flush interval, and never more than
 *   batchSize − 1 of them; what was committed survives (WAL, synchronous=NORMAL:
 *   a power cut may lose the last commits too, never the database).
 * - Housekeeping runs by itself (from the turn after open, then every
 *   `pruneIntervalMs`): records whose last packet is older than
 *   `retentionDays` (default 90) go, then, until the database is under
 *   `maxBytes` (default 256 MiB), the oldest of the user holding the most
 *   records go (holders.ts: a flood evicts its sender's own history, not
 *   everyone's), and the freed pages are given
 *   back to the file system. It runs as many short statements (each sized
 *   to about 5 ms) with the event loop given back between them: the worker
 *   takes records and answers queries between them (a prune of 100k records
 *   in one go held its thread for seconds).
 * - A database SQLite calls corrupt (garbage, a truncated file) is renamed
 *   aside with a timestamp and a fresh one is started beside it; one that
 *   cannot be written is an EGD_DENIAL_STORE error to the caller. Either way
 *   the caller logs it and enforcement never notices: the store is beside it.
 * - Readable by root and group `egressd-audit` only: the directory is 2750
 *   and the files 0640 root:egressd-audit (SQLite gives -wal and -shm the
 *   database's mode and, as root, its owner).
 * - `summary` reads a rollup the triggers keep (per hour, and for the whole
 *   store), not the rows, unless a filter other than time selects them.
 */
import {
  chmodSync,
  chownSync,
  closeSync,
  existsSync,
  fchmodSync,
  fchownSync,
  fstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  statSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import Database from 'better-sqlite3';
import type { Logger } from 'pino';
import { SHORT_ID } from '../compile/rule-ids.js';
import { EgressError, ErrorCode } from '../errors.js';
import { addressGroups, maskGroups, parseDestination } from '../policy/destination.js';
import { nssAccounts, type Accounts } from '../system/nss.js';
import { holderLookup, largestHolding, NO_UID } from './holders.js';
import type { DenialRecord } from './record.js';

export interface DenialFilter {
  readonly since?: number; // ms since the epoch, compared with lastSeen
  readonly until?: number;
  readonly app?: string; // an app or system domain name
  readonly dest?: string; // a name (exact, or *.suffix) or an address or CIDR
  readonly rule?: string; // a short id ("r1a2b3c4d") or the policy's rule id
  readonly uid?: number; // only this uid's records (a user's agent sees only its own)
  readonly limit?: number; // newest first; default 1000
}
export interface StoredDenial extends DenialRecord {
  readonly id: number;
}
export interface Ranked {
  readonly key: string;
  readonly count: number;
}
export interface DenialSummary {
  readonly records: number;
  readonly packets: number;
  readonly apps: readonly Ranked[];
  readonly destinations: readonly Ranked[];
  readonly rules: readonly Ranked[];
}
/**
 * The store as the daemon's parts use it: the database runs in a worker
 * thread (store-worker.ts), so `add` hands records over and returns at once
 * and everything that reads waits for the worker. What `add` cannot hand
 * over (the worker is behind by `maxQueued` records, or has failed) is
 * dropped and counted, never silently.
 */
export interface DenialStore {
  /** Batched: returns at once; written within the flush interval, or dropped and counted (counters()). */
  add(records: readonly DenialRecord[]): void;
  /** Resolves once every record added before it is written (or counted as failed). */
  flush(): Promise<void>;
  /** The row id `add` gave this record (the same object), once its batch is written; undefined before that, or when it never was. A map lookup: the D-Bus Denied signal asks it per record. */
  idOf(record: DenialRecord): number | undefined;
  query(filter: DenialFilter): Promise<StoredDenial[]>;
  get(id: number): Promise<StoredDenial | undefined>;
  summary(filter: DenialFilter): Promise<DenialSummary>;
  counters(): DenialStoreCounters;
  close(): Promise<void>;
}

/** What became of the records handed to a store's `add`: every one is queued, written, dropped or failed. */
export interface DenialStoreCounters {
  /** Handed over, not yet written. */
  readonly queued: number;
  /** The most that were ever queued at once (the bound holds: ≤ maxQueued). */
  readonly queuedPeak: number;
  readonly written: number;
  /** Not taken: the store was `maxQueued` records behind (a flood of new destinations), or had failed. */
  readonly dropped: number;
  /** The packets (record counts) of those. */
  readonly droppedEvents: number;
  /** Taken, but the database refused their batch (disk full, damage): reported as EGD_DENIAL_STORE. */
  readonly failed: number;
  readonly failedEvents: number;
}

/** The SQLite database itself, synchronous: what the store's worker thread runs, and tests and benchmarks open directly. */
export interface DenialDatabase {
  add(records: readonly DenialRecord[]): void;
  flush(): void;
  /** The row id `add` gave this record (the same object), once its batch is written; undefined before that, or when it never was. */
  idOf(record: DenialRecord): number | undefined;
  query(filter: DenialFilter): StoredDenial[];
  get(id: number): StoredDenial | undefined;
  summary(filter: DenialFilter): DenialSummary;
  close(): void;
}

export interface DenialStoreOptions {
  /** Records whose last packet is older go (default 90 days, the Qubes bound). */
  readonly retentionDays?: number;
  /** The database (pages in use) is kept under this (default 256 MiB). */
  readonly maxBytes?: number;
  readonly flushIntervalMs?: number;
  readonly batchSize?: number;
  /** How often housekeeping runs (default 1 h); it runs at open too. */
  readonly pruneIntervalMs?: number;
  /** The group that may read the store (default `egressd-audit`); null or a missing group: root alone. */
  readonly group?: string | null;
  readonly log?: Logger;
  /** Problems found where no caller waits (a timed flush or prune, a database replaced at open); default: logged. */
  readonly onError?: (error: EgressError) => void;
  readonly now?: () => number;
  /** Databases up to this size get a full quick_check at open (default 64 MiB); larger ones a check of their size. */
  readonly quickCheckMaxBytes?: number;
  /** Whose subordinate uids are whose, for the size cap (default /etc/subuid). */
  readonly subuidFile?: string;
  /** Told of every batch once it is committed (its row ids, in order) or refused (undefined): the worker tells the daemon's thread. */
  readonly onBatch?: (records: readonly DenialRecord[], ids: readonly number[] | undefined) => void;
}

/** The store as openDenialStore returns it: housekeeping can be asked for, and waited on (tests, benchmarks). */
export interface HouseKept {
  /** Prunes now (after a prune already running); resolves with what it removed. */
  prune(): Promise<{ age: number; size: number }>;
  /** Resolves when no prune is running (the one started at open included). */
  idle(): Promise<void>;
}

/** A closed store's housekeeping stops here. */
class PruneStopped extends Error {}

/** Each housekeeping statement is sized to take about this long on the store's thread. */
const SLICE_MS = 5;
/** Rows per DELETE: adapted between these to SLICE_MS. */
export const SLICE_ROWS = { min: 50, start: 500, max: 5000 } as const;
/** Pages given back to the file system per incremental_vacuum step. */
const VACUUM_PAGES = 256;

export const AUDIT_GROUP = 'egressd-audit';
export const DEFAULTS = { retentionDays: 90, maxBytes: 256 * 1024 * 1024, flushIntervalMs: 1000, batchSize: 1000, pruneIntervalMs: 3_600_000 } as const;
/** The schema this code writes (PRAGMA user_version); older ones are migrated at open, newer ones refused. */
export const SCHEMA_VERSION = 4;
const HOUR = 3_600_000;
/** The rollup's bucket for the whole store, beside one per hour. */
const ALL = -1;
/** Top entries `summary` ranks per dimension. */
export const SUMMARY_TOP = 10;
const DEFAULT_LIMIT = 1000;
const MAX_LIMIT = 1_000_000;

/** Where the store lives under a state directory. */
export function denialStorePath(stateDir: string): string {
  return join(stateDir, 'denials', 'denials.sqlite');
}

// The rollup keys, one SQL expression each for the triggers (NEW/OLD) and the exact path (the row).
const appKey = (r: string) => `coalesce(${r}app, ${r}domain, 'uid ' || ${r}uid, '(unknown)')`;
const destKey = (r: string) => `coalesce(${r}name, ${r}address)`;
const ruleKey = (r: string) => `${r}short_id || coalesce(' ' || ${r}rule_id, '') || coalesce(' ' || ${r}file || coalesce(':' || ${r}line, ''), '')`;
const KEYS = [appKey, destKey, ruleKey] as const;

/** A record's columns after its id (the schema's since version 1). */
const DENIAL_COLUMNS_SQL = `
    first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL, count INTEGER NOT NULL,
    short_id TEXT NOT NULL, rule_id TEXT, kind TEXT, file TEXT, line INTEGER,
    app TEXT, domain TEXT, uid INTEGER, gid INTEGER,
    protocol TEXT NOT NULL, family INTEGER NOT NULL, address TEXT NOT NULL, port INTEGER, name TEXT,
    addr BLOB NOT NULL, name_rev TEXT`;
/** The indexes the queries' filters read (time, app, domain, address, name, rule, uid). */
const DENIAL_INDEXES_SQL = `
  CREATE INDEX denials_last_seen ON denials(last_seen);
  CREATE INDEX denials_app ON denials(app, last_seen) WHERE app IS NOT NULL;
  CREATE INDEX denials_domain ON denials(domain, last_seen) WHERE domain IS NOT NULL;
  CREATE INDEX denials_addr ON denials(family, addr);
  CREATE INDEX denials_name ON denials(name_rev) WHERE name_rev IS NOT NULL;
  CREATE INDEX denials_short_id ON denials(short_id, last_seen);
  CREATE INDEX denials_rule_id ON denials(rule_id, last_seen) WHERE rule_id IS NOT NULL;
  CREATE INDEX denials_uid ON denials(uid, last_seen) WHERE uid IS NOT NULL;
`;
/** The rollup kept by triggers: summaries read it instead of the rows. */
const ROLLUP_TRIGGERS_SQL = `
  CREATE TRIGGER denials_rollup_add AFTER INSERT ON denials BEGIN
    ${KEYS.map(
      (key, dim) =>
        `INSERT INTO rollup VALUES (${dim}, NEW.last_seen / ${HOUR}, ${key('NEW.')}, 1, NEW.count), (${dim}, ${ALL}, ${key('NEW.')}, 1, NEW.count) ON CONFLICT (dim, hour, key) DO UPDATE SET records = records + 1, packets = packets + excluded.packets;`,
    ).join('\n    ')}
  END;
  CREATE TRIGGER denials_rollup_remove AFTER DELETE ON denials BEGIN
    ${KEYS.map(
      (key, dim) =>
        `UPDATE rollup SET records = records - 1, packets = packets - OLD.count WHERE dim = ${dim} AND hour IN (OLD.last_seen / ${HOUR}, ${ALL}) AND key = ${key('OLD.')};`,
    ).join('\n    ')}
  END;`;

/** Each uid's record count (orphaned sockets' under NO_UID), kept by triggers: the size cap takes from the largest holder without counting rows. */
const RECORDS_BY_UID_TRIGGERS_SQL = `
  CREATE TRIGGER denials_by_uid_add AFTER INSERT ON denials BEGIN
    INSERT INTO records_by_uid VALUES (coalesce(NEW.uid, ${NO_UID}), 1) ON CONFLICT (uid) DO UPDATE SET records = records + 1;
  END;
  CREATE TRIGGER denials_by_uid_remove AFTER DELETE ON denials BEGIN
    UPDATE records_by_uid SET records = records - 1 WHERE uid = coalesce(OLD.uid, ${NO_UID});
  END;`;
const FILL_RECORDS_BY_UID_SQL = `INSERT INTO records_by_uid SELECT coalesce(uid, ${NO_UID}), count(*) FROM denials GROUP BY 1;`;

/** The size cap's deletes: one uid's oldest records, through denials_uid and denials_no_uid (a test reads their plans). */
export const OLDEST_OF_UID_SQL = 'DELETE FROM denials WHERE id IN (SELECT id FROM denials WHERE uid = ? ORDER BY last_seen LIMIT ?)';
export const OLDEST_OF_NO_UID_SQL = 'DELETE FROM denials WHERE id IN (SELECT id FROM denials WHERE uid IS NULL ORDER BY last_seen LIMIT ?)';

/** Each schema version's step from the one before (exported for the migration test). */
export const MIGRATIONS: readonly string[] = [
  // 0 → 1
  `CREATE TABLE denials (id INTEGER PRIMARY KEY, ${DENIAL_COLUMNS_SQL}) STRICT;
  ${DENIAL_INDEXES_SQL}
  CREATE TABLE rollup (dim INTEGER NOT NULL, hour INTEGER NOT NULL, key TEXT NOT NULL, records INTEGER NOT NULL, packets INTEGER NOT NULL, PRIMARY KEY (dim, hour, key)) STRICT, WITHOUT ROWID;
  ${ROLLUP_TRIGGERS_SQL}`,
  // 1 → 2: a record's id is never given again, also once retention emptied the table (without AUTOINCREMENT SQLite
  // gives max(id) + 1): an agent's notification names its record by id, and "Allow" must not reach another record.
  `CREATE TABLE denials_next (id INTEGER PRIMARY KEY AUTOINCREMENT, ${DENIAL_COLUMNS_SQL}) STRICT;
  INSERT INTO denials_next SELECT * FROM denials;
  DROP TABLE denials;
  ALTER TABLE denials_next RENAME TO denials;
  ${DENIAL_INDEXES_SQL}
  ${ROLLUP_TRIGGERS_SQL}`,
  // 2 → 3: who looked the name up (the sender, or only other uids). Rows written before say nothing of it, and read as
  // "others": a name of unknown asker is never sent to a user's agent nor allowed by.
  `ALTER TABLE denials ADD COLUMN name_asked_by TEXT;`,
  // 3 → 4: each uid's record count, so the size cap evicts from the user holding the most, not the oldest of everyone's.
  `CREATE TABLE records_by_uid (uid INTEGER PRIMARY KEY, records INTEGER NOT NULL) STRICT;
  ${FILL_RECORDS_BY_UID_SQL}
  CREATE INDEX denials_no_uid ON denials(last_seen) WHERE uid IS NULL;
  ${RECORDS_BY_UID_TRIGGERS_SQL}`,
];

/** The columns a record is written to, in order. */
export const COLUMNS = [
  'first_seen',
  'last_seen',
  'count',
  'short_id',
  'rule_id',
  'kind',
  'file',
  'line',
  'app',
  'domain',
  'uid',
  'gid',
  'protocol',
  'family',
  'address',
  'port',
  'name',
  'addr',
  'name_rev',
  'name_asked_by',
] as const;

interface Row {
  id: number;
  first_seen: number;
  last_seen: number;
  count: number;
  short_id: string;
  rule_id: string | null;
  kind: string | null;
  file: string | null;
  line: number | null;
  app: string | null;
  domain: string | null;
  uid: number | null;
  gid: number | null;
  protocol: string;
  family: number;
  address: string;
  port: number | null;
  name: string | null;
  /** Absent in a version 1 or 2 store that egressctl reads before egressd migrates it. */
  name_asked_by?: string | null;
}

const u = <T>(value: T | null): T | undefined => (value === null ? undefined : value);

export function rowToDenial(row: Row): StoredDenial {
  return {
    id: row.id,
    firstSeen: row.first_seen,
    lastSeen: row.last_seen,
    count: row.count,
    shortId: row.short_id,
    ruleId: u(row.rule_id),
    kind: u(row.kind) as StoredDenial['kind'],
    file: u(row.file),
    line: u(row.line),
    app: u(row.app),
    domain: u(row.domain),
    uid: u(row.uid),
    gid: u(row.gid),
    protocol: row.protocol,
    family: row.family === 6 ? 6 : 4,
    address: row.address,
    port: u(row.port),
    name: u(row.name),
    nameAskedBy: row.name === null ? undefined : row.name_asked_by === 'sender' ? 'sender' : 'others',
  };
}

/** An address as bytes, network order: blobs compare like addresses, so a CIDR is a BETWEEN. */
function addressBytes(family: 4 | 6, groups: readonly number[]): Buffer {
  const bytes = Buffer.alloc(family === 4 ? 4 : 16);
  groups.forEach((group, i) => bytes.writeUInt16BE(group, 2 * i));
  return bytes;
}

/** A name reversed, so "*.example.org" is a prefix range on an index ("gro.elpmaxe" …). */
function reversed(name: string): string {
  // By UTF-16 unit: the same on the way in and in every query, which is all a prefix range needs.
  const text = name.toLowerCase().replace(/\.$/, '');
  let out = '';
  for (let i = text.length - 1; i >= 0; i--) out += text[i]!;
  return out;
}

/** A record as the store's row (the columns of COLUMNS, in order). */
export function recordValues(r: DenialRecord): unknown[] {
  const family = r.family === 6 ? 6 : 4;
  let addr: Buffer;
  try {
    addr = addressBytes(family, addressGroups(family, r.address));
  } catch {
    addr = Buffer.alloc(0);
  }
  const n = (v: number | undefined) => (v === undefined || !Number.isFinite(v) ? null : Math.trunc(v));
  return [
    Math.trunc(r.firstSeen),
    Math.trunc(r.lastSeen),
    Math.max(1, Math.trunc(r.count)),
    r.shortId,
    r.ruleId ?? null,
    r.kind ?? null,
    r.file ?? null,
    n(r.line),
    r.app ?? null,
    r.domain ?? null,
    n(r.uid),
    n(r.gid),
    r.protocol,
    family,
    r.address,
    n(r.port),
    r.name ?? null,
    addr,
    r.name === undefined ? null : reversed(r.name),
    r.name === undefined ? null : (r.nameAskedBy ?? 'others'),
  ];
}

function filterError(field: string, message: string): EgressError {
  return new EgressError(ErrorCode.DenialFilter, `${field}: ${message}`, { details: [field] });
}

/** A filter as SQL: the WHERE text and its parameters. Throws EGD_DENIAL_FILTER naming the field. */
export function filterSql(filter: DenialFilter): { where: string; params: unknown[]; timeOnly: boolean } {
  const clauses: string[] = [];
  const params: unknown[] = [];
  const time = (field: 'since' | 'until', value: number | undefined) => {
    if (value === undefined) return;
    if (typeof value !== 'number' || !Number.isFinite(value)) throw filterError(field, 'not a time (milliseconds since the epoch)');
    clauses.push(field === 'since' ? 'last_seen >= ?' : 'last_seen <= ?');
    params.push(Math.trunc(value));
  };
  time('since', filter.since);
  time('until', filter.until);
  let timeOnly = true;
  if (filter.app !== undefined) {
    if (typeof filter.app !== 'string' || filter.app === '') throw filterError('app', 'empty app name');
    clauses.push('(app = ? OR domain = ?)');
    params.push(filter.app, filter.app);
    timeOnly = false;
  }
  if (filter.dest !== undefined) {
    const { clause, values } = destSql(filter.dest);
    clauses.push(clause);
    params.push(...values);
    timeOnly = false;
  }
  if (filter.rule !== undefined) {
    if (typeof filter.rule !== 'string' || filter.rule === '') throw filterError('rule', 'empty rule id');
    if (SHORT_ID.test(filter.rule)) clauses.push('short_id = ?');
    else clauses.push('rule_id = ?');
    params.push(filter.rule);
    timeOnly = false;
  }
  if (filter.uid !== undefined) {
    if (!Number.isSafeInteger(filter.uid) || filter.uid < 0 || filter.uid > 0xffffffff) throw filterError('uid', `"${String(filter.uid)}" is not a uid`);
    clauses.push('uid = ?');
    params.push(filter.uid);
    timeOnly = false;
  }
  limitOf(filter);
  return { where: clauses.length === 0 ? '' : `WHERE ${clauses.join(' AND ')}`, params, timeOnly };
}

function destSql(dest: string): { clause: string; values: unknown[] } {
  if (typeof dest !== 'string') throw filterError('dest', 'not a string');
  const parsed = parseDestination(dest);
  if (!parsed.ok) throw filterError('dest', `${parsed.message}${parsed.hint ? ` (${parsed.hint})` : ''}`);
  const value = parsed.value;
  switch (value.kind) {
    case 'name':
      return { clause: 'name_rev = ?', values: [reversed(value.name)] };
    case 'suffix': {
      // As in policies, *.example.org covers example.org itself.
      const rev = reversed(value.suffix);
      return { clause: '(name_rev = ? OR (name_rev >= ? AND name_rev < ?))', values: [rev, `${rev}.`, `${rev}/`] };
    }
    case 'net': {
      const groups = addressGroups(value.family, value.address);
      const low = addressBytes(value.family, maskGroups(groups, value.prefix));
      const high = addressBytes(value.family, maskGroups(groups, value.prefix, true));
      return { clause: '(family = ? AND addr BETWEEN ? AND ?)', values: [value.family, low, high] };
    }
    default:
      throw filterError('dest', `"${dest}" is a ${value.kind} reference; give a name, *.suffix, address or CIDR`);
  }
}

function limitOf(filter: DenialFilter): number {
  const limit = filter.limit ?? DEFAULT_LIMIT;
  if (!Number.isSafeInteger(limit) || limit < 1 || limit > MAX_LIMIT)
    throw filterError('limit', `"${String(limit)}" is not a whole number from 1 to ${MAX_LIMIT}`);
  return limit;
}

/** An SQLite error as the store reports it: corrupt, unwritable, or another failure; with what SQLite said. */
function storeError(what: string, path: string, cause: unknown): EgressError {
  const code = (cause as { code?: string }).code ?? '';
  const message = cause instanceof Error ? cause.message : String(cause);
  return new EgressError(ErrorCode.DenialStore, `denial store ${path}: ${what}: ${message}${code ? ` (${code})` : ''}`, { cause, details: [code] });
}

const CORRUPT = new Set(['SQLITE_CORRUPT', 'SQLITE_NOTADB', 'SQLITE_CORRUPT_VTAB', 'SQLITE_CORRUPT_SEQUENCE', 'SQLITE_CORRUPT_INDEX']);
export function isCorrupt(error: unknown): boolean {
  const code = (error as { code?: string } | undefined)?.code;
  return typeof code === 'string' && CORRUPT.has(code);
}

/** The database is not SQLite's, or SQLite finds it damaged. */
/**
 * quick_check reads every page, and the daemon's keeper waits for the open
 * (in the store's worker): it is run on databases up to
 * QUICK_CHECK_MAX_BYTES. A larger one (and one left with a WAL, whose header
 * may lag behind) is checked by its header's page count against the file's
 * size, which catches a truncated file; damage elsewhere in it shows as
 * SQLITE_CORRUPT on the reads and writes that meet it, reported as
 * EGD_DENIAL_STORE.
 */
export const QUICK_CHECK_MAX_BYTES = 64 * 1024 * 1024;
function checkIntact(db: Database.Database, path: string, quickCheckMaxBytes: number): void {
  const corrupt = (what: string): never => {
    const error = new Error(what) as Error & { code: string };
    error.code = 'SQLITE_CORRUPT';
    throw error;
  };
  const size = statSync(path).size;
  if (size <= quickCheckMaxBytes) {
    const rows = db.pragma('quick_check(5)') as { quick_check: string }[];
    if (rows.length !== 1 || rows[0]!.quick_check !== 'ok') corrupt(`quick_check: ${rows.map((r) => r.quick_check).join('; ')}`);
    return;
  }
  const pages = db.pragma('page_count', { simple: true }) as number;
  const pageSize = db.pragma('page_size', { simple: true }) as number;
  if (!existsSync(`${path}-wal`) && pages * pageSize > size)
    corrupt(`the header counts ${pages} pages of ${pageSize} bytes; the file holds ${size} bytes (truncated)`);
}

/** A schema from a later egressd is never written to (a downgrade keeps its records for the upgrade back). */
function refuseNewer(db: Database.Database, path: string): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  if (version > SCHEMA_VERSION) {
    throw new EgressError(
      ErrorCode.DenialStore,
      `denial store ${path}: schema version ${version} is newer than this egressd knows (${SCHEMA_VERSION}); left untouched`,
      {
        details: ['newer-schema'],
      },
    );
  }
}

function migrate(db: Database.Database): void {
  const version = db.pragma('user_version', { simple: true }) as number;
  for (let v = version; v < SCHEMA_VERSION; v++) {
    db.transaction(() => {
      db.exec(MIGRATIONS[v]!);
      db.pragma(`user_version = ${v + 1}`);
    })();
  }
}

/** The audit group's id, when it exists. */
function auditGid(group: string | null): number | undefined {
  if (group === null) return undefined;
  const found = nssAccounts().group(group);
  return found !== undefined && !('error' in found) ? found.gid : undefined;
}

/**
 * Root's and the audit group's alone: 2750 for the directory (new files take its group), 0640 for the files.
 * Only what differs is changed: under the shipped unit, egressd has no CAP_CHOWN and its seccomp filter
 * (RestrictSUIDSGID=yes) refuses any chmod that sets the setgid bit — tmpfiles made the directory right at
 * boot, and nothing here may fail for repeating it.
 */
function ensureModes(path: string, gid: number | undefined): void {
  const dir = dirname(path);
  mkdirSync(dir, { recursive: true, mode: 0o750 });
  const owner = process.getuid?.() === 0;
  const group = gid ?? 0;
  const ensureOwner = (stat: { uid: number; gid: number }, change: () => void): void => {
    if (owner && (stat.uid !== 0 || stat.gid !== group)) change();
  };
  ensureOwner(statSync(dir), () => chownSync(dir, 0, group));
  if (gid !== undefined) {
    // The group must pass through the state directory to reach this one: search (o+x), never listing; its own files stay 0640 root:root.
    const parent = dirname(dir);
    const mode = statSync(parent).mode & 0o7777;
    if ((mode & 0o001) === 0) chmodSync(parent, mode | 0o001);
  }
  if ((statSync(dir).mode & 0o7777) !== 0o2750) {
    try {
      chmodSync(dir, 0o2750);
    } catch (error) {
      // Refused the setgid bit (seccomp): the directory at least keeps everyone but root and its group out.
      if ((error as NodeJS.ErrnoException).code !== 'EPERM') throw error;
      chmodSync(dir, 0o750);
    }
  }
  // Made before SQLite opens it: SQLite gives -wal and -shm the database's mode (and, as root, its owner).
  const fd = openSync(path, 'a', 0o640);
  try {
    const stat = fstatSync(fd);
    ensureOwner(stat, () => fchownSync(fd, 0, group));
    if ((stat.mode & 0o7777) !== 0o640) fchmodSync(fd, 0o640);
  } finally {
    closeSync(fd);
  }
  for (const extra of ['-wal', '-shm']) {
    if (!existsSync(path + extra)) continue;
    const stat = statSync(path + extra);
    ensureOwner(stat, () => chownSync(path + extra, 0, group));
    if ((stat.mode & 0o7777) !== 0o640) chmodSync(path + extra, 0o640);
  }
}

/** Moves a damaged database (and its -wal, -shm) aside: FILE.corrupt-2026-12-04T22-53-34Z. Returns the new name. */
function keepAside(path: string, now: number): string {
  const stamp = new Date(now)
    .toISOString()
    .replace(/\.\d+Z$/, 'Z')
    .replace(/:/g, '-');
  let aside = `${path}.corrupt-${stamp}`;
  for (let n = 1; existsSync(aside); n++) aside = `${path}.corrupt-${stamp}-${n}`;
  renameSync(path, aside);
  for (const extra of ['-wal', '-shm']) if (existsSync(path + extra)) renameSync(path + extra, aside + extra);
  return aside;
}

function openDatabase(path: string, quickCheckMaxBytes: number): Database.Database {
  const db = new Database(path, { timeout: 5000 });
  try {
    refuseNewer(db, path);
    // Before anything writes the first page: a new database then gives pages back to the file system when pruned (an existing one keeps its mode).
    db.pragma('auto_vacuum = INCREMENTAL');
    db.pragma('journal_mode = WAL');
    db.pragma('synchronous = NORMAL');
    // 8 MiB of pages (default 2): the indexes' random inserts then mostly hit memory (16 MiB gave ≈ 30 % more records/s than 2, but
    // under a flood the cache fills and stays: it is the worker's RSS, and issue 20 bounds the daemon's at 150 MB — bench/README.md).
    db.pragma('cache_size = -8192');
    // The WAL is checkpointed every 1000 pages and cut back to this after: it never grows past the size cap's reach.
    db.pragma('journal_size_limit = 16777216');
    checkIntact(db, path, quickCheckMaxBytes);
    migrate(db);
    return db;
  } catch (error) {
    db.close();
    throw error;
  }
}

/**
 * A fresh database started beside a damaged one gives ids from the time in
 * microseconds on, not from 1: the damaged one's ids cannot be read, and an
 * agent's notification still open names its record by id — "Allow" on it
 * must reach no record of the new database (it is refused as unknown).
 * Ids from one database started at time T stay below T + (elapsed µs) as
 * long as fewer than a million records a second are written, which is far
 * above what the store writes (bench/README.md); and below 2^53 until the
 * year 2255.
 */
function startIdsAfterReplacement(db: Database.Database, nowMs: number): void {
  const floor = Math.floor(nowMs) * 1000;
  db.prepare("INSERT INTO sqlite_sequence (name, seq) SELECT 'denials', ? WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'denials')").run(floor);
  db.prepare("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'denials'").run(floor);
}

export function openDenialStore(path: string, options: DenialStoreOptions = {}): DenialDatabase & HouseKept {
  const o = { ...DEFAULTS, ...options };
  const now = options.now ?? Date.now;
  const log = options.log;
  const report =
    options.onError ??
    ((error: EgressError) =>
      log?.error({ event: 'denial-store-failed', code: error.code, error: error.message }, 'the denial store failed; enforcement goes on'));
  for (const [name, value] of Object.entries({
    retentionDays: o.retentionDays,
    maxBytes: o.maxBytes,
    flushIntervalMs: o.flushIntervalMs,
    batchSize: o.batchSize,
    pruneIntervalMs: o.pruneIntervalMs,
  })) {
    if (!(typeof value === 'number' && value > 0 && Number.isFinite(value)))
      throw new EgressError(ErrorCode.Usage, `denial store: ${name} must be a positive number, not ${String(value)}`);
  }

  let db: Database.Database;
  try {
    ensureModes(path, auditGid(o.group === undefined ? AUDIT_GROUP : o.group));
    try {
      db = openDatabase(path, o.quickCheckMaxBytes ?? QUICK_CHECK_MAX_BYTES);
    } catch (error) {
      if (!isCorrupt(error)) throw error;
      const aside = keepAside(path, now());
      ensureModes(path, auditGid(o.group === undefined ? AUDIT_GROUP : o.group));
      db = openDatabase(path, o.quickCheckMaxBytes ?? QUICK_CHECK_MAX_BYTES);
      startIdsAfterReplacement(db, now());
      const replaced = storeError(`damaged; kept as ${aside}, a fresh one started`, path, error);
      log?.error(
        { event: 'denial-store-replaced', code: replaced.code, path, keptAs: aside, error: (error as Error).message },
        'the denial store was damaged: kept aside, a fresh one started',
      );
      if (options.onError) options.onError(replaced);
    }
  } catch (error) {
    if (error instanceof EgressError) throw error;
    throw storeError('cannot be opened for writing', path, error);
  }

  const insert = db.prepare(`INSERT INTO denials (${COLUMNS.join(', ')}) VALUES (${COLUMNS.map(() => '?').join(', ')})`);
  // Weak: a record's id lives as long as someone (the D-Bus signal waiting for it) holds the record.
  const ids = new WeakMap<DenialRecord, number>();
  const writeBatch = db.transaction((records: readonly DenialRecord[]) => {
    const written: [DenialRecord, number][] = [];
    for (const record of records) written.push([record, Number(insert.run(recordValues(record)).lastInsertRowid)]);
    return written;
  });
  const byId = db.prepare('SELECT * FROM denials WHERE id = ?');

  let pending: DenialRecord[] = [];
  let closed = false;

  const flush = (): void => {
    if (pending.length === 0) return;
    const batch = pending;
    pending = [];
    let written: [DenialRecord, number][];
    try {
      // Known only once committed: a rolled-back batch gives no ids.
      written = writeBatch(batch);
    } catch (error) {
      // The batch is dropped rather than kept: a database that refuses one batch (disk full, damage) would refuse a growing backlog too.
      options.onBatch?.(batch, undefined);
      throw storeError(`${batch.length} records not written`, path, error);
    }
    for (const [record, id] of written) ids.set(record, id);
    options.onBatch?.(
      batch,
      written.map(([, id]) => id),
    );
  };
  const timedFlush = (): void => {
    try {
      flush();
    } catch (error) {
      report(error as EgressError);
    }
  };

  const usedBytes = (): number => {
    const pageSize = db.pragma('page_size', { simple: true }) as number;
    const pages = db.pragma('page_count', { simple: true }) as number;
    const free = db.pragma('freelist_count', { simple: true }) as number;
    return (pages - free) * pageSize;
  };

  // Housekeeping shares the store's thread with adds and queries: every step below is one bounded statement, and the loop is given back between steps.
  const ageSlice = db.prepare('DELETE FROM denials WHERE id IN (SELECT id FROM denials WHERE last_seen < ? LIMIT ?)');
  const oldestOfUid = db.prepare(OLDEST_OF_UID_SQL);
  const oldestOfNoUid = db.prepare(OLDEST_OF_NO_UID_SQL);
  const recordsByUid = db.prepare('SELECT uid, records FROM records_by_uid WHERE records > 0');
  const dropEmptyRollup = db.prepare('DELETE FROM rollup WHERE records <= 0');
  const dropEmptyByUid = db.prepare('DELETE FROM records_by_uid WHERE records <= 0');
  // Looked up only when /etc/subuid names an owner by name (loading NSS is not free).
  let accounts: Accounts | undefined;
  const lookupUser: Pick<Accounts, 'user'> = { user: (key) => (accounts ??= nssAccounts()).user(key) };
  let sliceRows: number = SLICE_ROWS.start;
  /** A closed store ends its housekeeping at the next step. */
  const stillOpen = async (): Promise<void> => {
    await new Promise((resolve) => setImmediate(resolve));
    if (closed) throw new PruneStopped();
  };

  /** Deletes up to `max` rows in slices, each sized to take about SLICE_MS (rows per slice adapt to what the last took), yielding between them. */
  const deleteSliced = async (slice: Database.Statement, params: unknown[], max: number): Promise<number> => {
    let total = 0;
    while (total < max) {
      await stillOpen();
      const rows = Math.min(sliceRows, max - total);
      const started = performance.now();
      const { changes } = slice.run(...params, rows);
      const took = performance.now() - started;
      if (took > SLICE_MS) sliceRows = Math.max(SLICE_ROWS.min, Math.floor(sliceRows / 2));
      else if (took < SLICE_MS / 2) sliceRows = Math.min(SLICE_ROWS.max, sliceRows * 2);
      total += changes;
      if (changes < rows) break;
    }
    return total;
  };

  const prune = async (): Promise<{ age: number; size: number }> => {
    await stillOpen();
    flush();
    const cutoff = now() - o.retentionDays * 86_400_000;
    const age = await deleteSliced(ageSlice, [cutoff], Number.MAX_SAFE_INTEGER);
    if (age > 0)
      log?.info(
        { event: 'denials-pruned', reason: 'age', records: age, before: new Date(cutoff).toISOString() },
        `${age} denial records older than ${o.retentionDays} days removed`,
      );
    let size = 0;
    await stillOpen();
    const bytesBefore = usedBytes();
    // Read once a prune: /etc/subuid may have changed since the last.
    const holderOf = bytesBefore > o.maxBytes ? holderLookup(o.subuidFile ?? '/etc/subuid', lookupUser) : undefined;
    while (holderOf !== undefined && usedBytes() > o.maxBytes) {
      const counts = recordsByUid.all() as { uid: number; records: number }[];
      const largest = largestHolding(counts, holderOf);
      if (largest === undefined) break;
      // A tenth of the store (at least 1000 records) a round, a few rounds and not a row at a time, all from the user holding
      // the most: its oldest, from its uid holding the most on. Whoever floods the store evicts its own records first.
      const total = counts.reduce((sum, c) => sum + c.records, 0);
      let budget = Math.min(largest.records, Math.max(1000, Math.floor(total / 10)));
      let removed = 0;
      for (const { uid, records } of largest.uids) {
        if (budget <= 0) break;
        const max = Math.min(budget, records);
        const gone = uid === NO_UID ? await deleteSliced(oldestOfNoUid, [], max) : await deleteSliced(oldestOfUid, [uid], max);
        removed += gone;
        budget -= gone;
      }
      size += removed;
      // The emptied rows of the rollup and the counts go too, or they would hold the pages the loop measures.
      await stillOpen();
      dropEmptyRollup.run();
      dropEmptyByUid.run();
      if (removed === 0) break;
      await stillOpen();
    }
    if (age + size > 0) {
      await stillOpen();
      dropEmptyRollup.run();
      dropEmptyByUid.run();
      // The freed pages go back to the file system a slice at a time too.
      while ((db.pragma('freelist_count', { simple: true }) as number) > 0) {
        await stillOpen();
        db.pragma(`incremental_vacuum(${VACUUM_PAGES})`);
      }
      await stillOpen();
      // The WAL is at most about the auto-checkpoint's 1000 pages here: this copies those back and cuts the file.
      db.pragma('wal_checkpoint(TRUNCATE)');
    }
    if (size > 0)
      log?.info(
        { event: 'denials-pruned', reason: 'size', records: size, bytesBefore, bytesAfter: usedBytes(), maxBytes: o.maxBytes },
        `${size} denial records removed, the oldest of the users holding the most, to keep the store under ${o.maxBytes} bytes`,
      );
    return { age, size };
  };
  /** The prune running now, if any: one at a time. */
  let pruning: Promise<unknown> | undefined;
  const track = <T>(done: Promise<T>): Promise<T> => {
    const settled = done.then(
      () => undefined,
      () => undefined,
    );
    pruning = settled;
    void settled.then(() => {
      if (pruning === settled) pruning = undefined;
    });
    return done;
  };
  // A prune still running when the timer comes again is left to finish, not doubled.
  const timedPrune = (): void => {
    if (pruning) return;
    void track(
      prune().catch((error: unknown) => {
        if (!(error instanceof PruneStopped)) report(error instanceof EgressError ? error : storeError('housekeeping failed', path, error));
      }),
    );
  };

  // At open too, but from the next turn on: opening (the keeper part's start) never waits on it.
  timedPrune();
  const flushTimer = setInterval(timedFlush, o.flushIntervalMs).unref();
  const pruneTimer = setInterval(timedPrune, o.pruneIntervalMs).unref();

  const run = <T>(what: string, body: () => T): T => {
    if (closed) throw new EgressError(ErrorCode.DenialStore, `denial store ${path}: closed`);
    try {
      return body();
    } catch (error) {
      if (error instanceof EgressError) throw error;
      throw storeError(what, path, error);
    }
  };

  const store: DenialDatabase & HouseKept = {
    add(records) {
      if (closed) throw new EgressError(ErrorCode.DenialStore, `denial store ${path}: closed`);
      for (const record of records) pending.push(record);
      if (pending.length >= o.batchSize) flush();
    },
    flush() {
      run('flush', flush);
    },
    idOf(record) {
      return ids.get(record);
    },
    query(filter) {
      const { where, params } = filterSql(filter);
      const limit = limitOf(filter);
      return run('query', () =>
        (db.prepare(`SELECT * FROM denials ${where} ORDER BY last_seen DESC, id DESC LIMIT ?`).all(...params, limit) as Row[]).map(rowToDenial),
      );
    },
    get(id) {
      if (!Number.isSafeInteger(id) || id < 1) throw filterError('id', `"${String(id)}" is not a record id`);
      return run('get', () => {
        const row = byId.get(id) as Row | undefined;
        return row === undefined ? undefined : rowToDenial(row);
      });
    },
    summary(filter) {
      const sql = filterSql(filter);
      return run('summary', () => summarise(db, filter, sql));
    },
    async prune() {
      // After any prune already running (the one at open), then one of its own, whose errors are the caller's.
      while (pruning) await pruning;
      if (closed) throw new EgressError(ErrorCode.DenialStore, `denial store ${path}: closed`);
      return track(
        prune().catch((error: unknown) => {
          throw error instanceof PruneStopped
            ? new EgressError(ErrorCode.DenialStore, `denial store ${path}: closed`)
            : error instanceof EgressError
              ? error
              : storeError('housekeeping failed', path, error);
        }),
      );
    },
    async idle() {
      while (pruning) await pruning;
    },
    close() {
      if (closed) return;
      clearInterval(flushTimer);
      clearInterval(pruneTimer);
      try {
        flush();
      } finally {
        closed = true;
        db.close();
      }
    },
  };
  return store;
}

/** Opens the store for reading only (`egressctl denials`): no housekeeping, no writes. */
export function openDenialReader(
  path: string,
): Pick<DenialDatabase, 'query' | 'get' | 'summary' | 'close'> & { maxId(): number; newer(afterId: number, filter: DenialFilter): StoredDenial[] } {
  const db = openForReading(path);
  return {
    newer(afterId, filter) {
      const { where, params } = filterSql(filter);
      const clause = where === '' ? 'WHERE id > ?' : `${where} AND id > ?`;
      return (db.prepare(`SELECT * FROM denials ${clause} ORDER BY id LIMIT 100000`).all(...params, afterId) as Row[]).map(rowToDenial);
    },
    query(filter) {
      const { where, params } = filterSql(filter);
      return (db.prepare(`SELECT * FROM denials ${where} ORDER BY last_seen DESC, id DESC LIMIT ?`).all(...params, limitOf(filter)) as Row[]).map(rowToDenial);
    },
    get(id) {
      const row = db.prepare('SELECT * FROM denials WHERE id = ?').get(id) as Row | undefined;
      return row === undefined ? undefined : rowToDenial(row);
    },
    summary(filter) {
      return summarise(db, filter, filterSql(filter));
    },
    maxId() {
      return (db.prepare('SELECT coalesce(max(id), 0) AS id FROM denials').get() as { id: number }).id;
    },
    close() {
      db.close();
    },
  };
}

/**
 * Readers outside the daemon may not write the directory, so cannot make
 * the -shm file a WAL database needs: while egressd runs they use its
 * files; when it has stopped (and checkpointed everything into the main
 * file, removing them) the file is read into memory and opened there.
 */
function openForReading(path: string): Database.Database {
  statSync(path);
  const check = (db: Database.Database) => {
    const version = db.pragma('user_version', { simple: true }) as number;
    // Versions 1 and 2 lack only who asked for the name (read as others'): readable until egressd, restarted, migrates it.
    if (version < 1 || version > SCHEMA_VERSION)
      throw new EgressError(ErrorCode.DenialStore, `denial store ${path}: schema version ${version}, this egressctl reads 1 to ${SCHEMA_VERSION}`);
    return db;
  };
  let db: Database.Database | undefined;
  try {
    db = new Database(path, { readonly: true, fileMustExist: true });
    return check(db);
  } catch (error) {
    db?.close();
    if (error instanceof EgressError) throw error;
    const code = (error as { code?: string }).code ?? '';
    if (!code.startsWith('SQLITE_READONLY') && code !== 'SQLITE_CANTOPEN') throw error;
    if (existsSync(`${path}-wal`)) throw error;
  }
  const image = readFileSync(path);
  // Bytes 18 and 19 say WAL; a database in memory has no WAL, so it is read as a rollback-journal one.
  if (image.length >= 20) image[18] = image[19] = 1;
  return check(new Database(image, { readonly: true }));
}

/**
 * Fills the rollup and the counts by uid from the rows, as the triggers
 * would have: for a bulk load that wrote rows with the triggers dropped
 * (bench/denials-store.ts), and any future migration that changes a key.
 */
export function rebuildRollup(db: Database.Database): void {
  db.transaction(() => {
    db.exec(`DELETE FROM records_by_uid; ${FILL_RECORDS_BY_UID_SQL}`);
    db.exec('DELETE FROM rollup');
    KEYS.forEach((key, dim) => {
      db.exec(`INSERT INTO rollup SELECT ${dim}, last_seen / ${HOUR}, ${key('')}, count(*), sum(count) FROM denials GROUP BY 2, 3`);
      db.exec(`INSERT INTO rollup SELECT ${dim}, ${ALL}, ${key('')}, count(*), sum(count) FROM denials GROUP BY 3`);
    });
  })();
}

type Tally = Map<string, { records: number; packets: number }>[];

/**
 * Totals and the top apps, destinations and rules among the records a
 * filter selects. Time alone is answered from the rollup: the whole store
 * from its ALL bucket; a period from the hours inside it plus the rows of
 * the hours it cuts — or, when the period covers most of the store, the
 * whole store less what lies outside it, whichever reads less. Any other
 * filter reads the rows it selects (through its index).
 */
function summarise(db: Database.Database, filter: DenialFilter, sql: ReturnType<typeof filterSql>): DenialSummary {
  const tally: Tally = [0, 1, 2].map(() => new Map<string, { records: number; packets: number }>());
  const addTo = (dim: number, key: string, records: number, packets: number) => {
    const entry = tally[dim]!.get(key);
    if (entry) {
      entry.records += records;
      entry.packets += packets;
    } else tally[dim]!.set(key, { records, packets });
  };
  type Counted = { key: string; records: number; packets: number };
  const exact = (where: string, params: unknown[], sign: number) => {
    KEYS.forEach((key, dim) => {
      for (const row of db
        .prepare(`SELECT ${key('')} AS key, count(*) AS records, sum(count) AS packets FROM denials ${where} GROUP BY 1`)
        .all(...params) as Counted[])
        addTo(dim, row.key, sign * row.records, sign * row.packets);
    });
  };
  const hours = (from: number, to: number, sign: number) => {
    KEYS.forEach((_, dim) => {
      const rows = db
        .prepare('SELECT key, sum(records) AS records, sum(packets) AS packets FROM rollup WHERE dim = ? AND hour >= ? AND hour < ? GROUP BY key')
        .all(dim, from, to) as Counted[];
      for (const row of rows) addTo(dim, row.key, sign * row.records, sign * row.packets);
    });
  };
  /** Rows with lo ≤ last_seen ≤ hi: whole hours from the rollup, the rest from the rows. */
  const range = (lo: number, hi: number, sign: number) => {
    const first = Math.ceil(lo / HOUR);
    const end = Math.floor((hi + 1) / HOUR);
    if (first >= end) {
      exact('WHERE last_seen >= ? AND last_seen <= ?', [lo, hi], sign);
      return;
    }
    hours(first, end, sign);
    if (lo < first * HOUR) exact('WHERE last_seen >= ? AND last_seen < ?', [lo, first * HOUR], sign);
    if (end * HOUR <= hi) exact('WHERE last_seen >= ? AND last_seen <= ?', [end * HOUR, hi], sign);
  };
  if (!sql.timeOnly) {
    exact(sql.where, sql.params, 1);
  } else if (filter.since === undefined && filter.until === undefined) {
    hours(ALL, ALL + 1, 1);
  } else {
    const span = db.prepare('SELECT min(last_seen) AS lo, max(last_seen) AS hi FROM denials').get() as { lo: number | null; hi: number | null };
    if (span.lo !== null && span.hi !== null) {
      const lo = Math.max(span.lo, Math.trunc(filter.since ?? span.lo));
      const hi = Math.min(span.hi, Math.trunc(filter.until ?? span.hi));
      if (lo <= hi) {
        if (hi - lo <= lo - span.lo + (span.hi - hi)) range(lo, hi, 1);
        else {
          hours(ALL, ALL + 1, 1);
          if (lo > span.lo) range(span.lo, lo - 1, -1);
          if (hi < span.hi) range(hi + 1, span.hi, -1);
        }
      }
    }
  }
  const ranked = (dim: number): Ranked[] =>
    [...tally[dim]!.entries()]
      .filter(([, v]) => v.records > 0)
      .sort((a, b) => b[1].packets - a[1].packets || (a[0] < b[0] ? -1 : 1))
      .slice(0, SUMMARY_TOP)
      .map(([key, v]) => ({ key, count: v.packets }));
  let records = 0;
  let packets = 0;
  for (const v of tally[0]!.values()) {
    records += v.records;
    packets += v.packets;
  }
  return { records, packets, apps: ranked(0), destinations: ranked(1), rules: ranked(2) };
}
