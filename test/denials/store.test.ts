import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { ErrorCode, type EgressError } from '../../src/errors.js';
import {
  denialStorePath,
  MIGRATIONS,
  OLDEST_OF_NO_UID_SQL,
  OLDEST_OF_UID_SQL,
  openDenialReader,
  openDenialStore,
  SCHEMA_VERSION,
  SLICE_ROWS,
  type DenialStore,
  type DenialSummary,
} from '../../src/denials/store.js';
import type { DenialRecord } from '../../src/denials/record.js';
import { ensureTestUsers } from '../harness/index.js';
import { killWriterMidWrite, writtenSequence } from './killed-writer.js';
import { denial, manyDenials } from './store-records.js';

const scratch = mkdtempSync(join(tmpdir(), 'egd-store-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;
const freshPath = () => denialStorePath(join(scratch, `s${++n}`));
const HOUR = 3_600_000;
const T0 = Date.UTC(2026, 11, 4, 12, 0);

function open(path = freshPath(), options: Parameters<typeof openDenialStore>[1] = {}): ReturnType<typeof openDenialStore> {
  return openDenialStore(path, { group: null, now: () => T0, ...options });
}

/** The summary computed the slow, obvious way from the records themselves. */
function bruteSummary(records: readonly DenialRecord[]): DenialSummary {
  const tally = (key: (r: DenialRecord) => string) => {
    const m = new Map<string, number>();
    for (const r of records) m.set(key(r), (m.get(key(r)) ?? 0) + r.count);
    return [...m.entries()]
      .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1))
      .slice(0, 10)
      .map(([key, count]) => ({ key, count }));
  };
  return {
    records: records.length,
    packets: records.reduce((s, r) => s + r.count, 0),
    apps: tally((r) => r.app ?? r.domain ?? (r.uid === undefined ? '(unknown)' : `uid ${r.uid}`)),
    destinations: tally((r) => r.name ?? r.address),
    rules: tally((r) => `${r.shortId}${r.ruleId ? ` ${r.ruleId}` : ''}${r.file ? ` ${r.file}${r.line ? `:${r.line}` : ''}` : ''}`),
  };
}

describe('denial store: queries', () => {
  const store = open();
  const records = [
    denial({ lastSeen: T0 - 10 * 60_000, name: 'telemetry.mozilla.org', address: '192.0.2.7' }),
    denial({ lastSeen: T0 - 9 * 60_000, name: 'mozilla.org', address: '192.0.2.200' }),
    denial({ lastSeen: T0 - 8 * 60_000, name: 'notmozilla.org', address: '198.51.100.9' }),
    denial({ lastSeen: T0 - 7 * 60_000, name: undefined, family: 6, address: '2001:db8:1::5', app: undefined, domain: 'updates', uid: 0 }),
    denial({
      lastSeen: T0 - 6 * 60_000,
      name: 'a.b.mozilla.org',
      family: 6,
      address: '2001:db8:2::1',
      shortId: 'rdeadbeef',
      ruleId: 'deny/10-phone-home.yaml/1',
      kind: 'global-deny',
      file: '10-phone-home.yaml',
      line: 27,
      app: undefined,
      uid: 1001,
    }),
    denial({
      lastSeen: T0 - 5 * 60_000,
      name: undefined,
      address: '203.0.113.1',
      uid: undefined,
      gid: undefined,
      app: undefined,
      protocol: 'icmp',
      port: undefined,
    }),
  ];
  store.add(records);
  store.flush();
  const ids = (filter: Parameters<DenialStore['query']>[0]) => store.query(filter).map((r) => r.address);

  it('gives records back exactly as added, newest first, each with its id', () => {
    const all = store.query({});
    expect(all.map((r) => r.lastSeen)).toEqual(records.map((r) => r.lastSeen).reverse());
    for (const stored of all) {
      const { id, ...rest } = stored;
      expect(records).toContainEqual(Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined)) as never);
      expect(store.get(id)).toEqual(stored);
    }
    expect(store.get(999_999)).toBeUndefined();
    expect(store.query({ limit: 2 }).map((r) => r.address)).toEqual(['203.0.113.1', '2001:db8:2::1']);
  });

  it('dest: exact names, *.suffix (with the name itself, not a longer one), addresses, v4 and v6 CIDRs', () => {
    expect(ids({ dest: 'mozilla.org' })).toEqual(['192.0.2.200']);
    expect(ids({ dest: 'MOZILLA.org' })).toEqual(['192.0.2.200']);
    expect(ids({ dest: '*.mozilla.org' }).sort()).toEqual(['192.0.2.200', '192.0.2.7', '2001:db8:2::1']);
    expect(ids({ dest: '192.0.2.0/24' }).sort()).toEqual(['192.0.2.200', '192.0.2.7']);
    expect(ids({ dest: '192.0.2.128/25' })).toEqual(['192.0.2.200']);
    expect(ids({ dest: '198.51.100.9' })).toEqual(['198.51.100.9']);
    expect(ids({ dest: '2001:db8::/32' }).sort()).toEqual(['2001:db8:1::5', '2001:db8:2::1']);
    expect(ids({ dest: '2001:db8:1::/48' })).toEqual(['2001:db8:1::5']);
    expect(ids({ dest: '0.0.0.0/0' })).toHaveLength(4);
    expect(ids({ dest: '::/0' })).toHaveLength(2);
  });

  it('rule by short id or rule id; app or system domain; uid; since and until on the last packet', () => {
    expect(ids({ rule: 'rdeadbeef' })).toEqual(['2001:db8:2::1']);
    expect(ids({ rule: 'deny/10-phone-home.yaml/1' })).toEqual(['2001:db8:2::1']);
    expect(ids({ rule: 'r1a2b3c4d' })).toHaveLength(5);
    expect(ids({ app: 'updates' })).toEqual(['2001:db8:1::5']);
    expect(ids({ app: 'firefox' })).toHaveLength(3);
    expect(ids({ uid: 0 })).toEqual(['2001:db8:1::5']);
    expect(ids({ uid: 1001 })).toEqual(['2001:db8:2::1']);
    expect(ids({ since: T0 - 7 * 60_000, until: T0 - 6 * 60_000 })).toEqual(['2001:db8:2::1', '2001:db8:1::5']);
    expect(ids({ app: 'firefox', dest: '*.mozilla.org', since: T0 - 9 * 60_000 })).toEqual(['192.0.2.200']);
  });

  it('bad filters are EGD_DENIAL_FILTER errors naming the field, before any SQL runs', () => {
    const fails = (filter: object, field: string) => {
      let caught: EgressError | undefined;
      try {
        store.query(filter);
      } catch (error) {
        caught = error as EgressError;
      }
      expect(caught?.code, JSON.stringify(filter)).toBe(ErrorCode.DenialFilter);
      expect(caught?.details[0]).toBe(field);
      expect(caught?.message).toMatch(new RegExp(`^${field}: `));
    };
    fails({ dest: '300.1.2.3' }, 'dest');
    fails({ dest: '192.0.2.1/24' }, 'dest');
    fails({ dest: '@tracking' }, 'dest');
    fails({ dest: 'no spaces.example' }, 'dest');
    fails({ dest: "x' OR 1=1 --" }, 'dest');
    fails({ uid: -1 }, 'uid');
    fails({ uid: 1.5 }, 'uid');
    fails({ limit: 0 }, 'limit');
    fails({ since: Number.NaN }, 'since');
    fails({ until: 'yesterday' }, 'until');
    fails({ rule: '' }, 'rule');
    fails({ app: '' }, 'app');
    expect(() => store.get(-1)).toThrow(expect.objectContaining({ code: ErrorCode.DenialFilter }));
    // A quote in a value is a value, never SQL.
    expect(store.query({ app: "x' OR '1'='1" })).toEqual([]);
  });
});

describe('denial store: summary', () => {
  it('the rollup agrees with the records: whole store, periods cut mid-hour, filters', () => {
    const records = [...manyDenials(3000, { end: T0, stepMs: 7_000, apps: 13, dests: 300, rules: 17 })];
    const store = open();
    store.add(records);
    store.flush();
    const within = (since?: number, until?: number) =>
      records.filter((r) => (since === undefined || r.lastSeen >= since) && (until === undefined || r.lastSeen <= until));
    expect(store.summary({})).toEqual(bruteSummary(records));
    for (const [since, until] of [
      [T0 - 3 * HOUR - 1234, undefined],
      [undefined, T0 - 2 * HOUR + 17],
      [T0 - 5 * HOUR + 1, T0 - HOUR - 1],
      [T0 - 4 * HOUR, T0 - 2 * HOUR],
      [T0 - 2 * HOUR - 60_000, T0 - 2 * HOUR + 60_000],
    ] as const) {
      const filter = { ...(since === undefined ? {} : { since }), ...(until === undefined ? {} : { until }) };
      expect(store.summary(filter), JSON.stringify(filter)).toEqual(bruteSummary(within(since, until)));
    }
    expect(store.summary({ app: 'app3' })).toEqual(bruteSummary(records.filter((r) => r.app === 'app3')));
    expect(store.summary({ uid: 1002, since: T0 - 2 * HOUR })).toEqual(bruteSummary(within(T0 - 2 * HOUR).filter((r) => r.uid === 1002)));
    store.close();
  });
});

describe('denial store: writes are batched', () => {
  it('add returns at once; rows appear within the flush interval, or at once when a batch is full', async () => {
    const path = freshPath();
    const store = open(path, { flushIntervalMs: 150, batchSize: 50 });
    const other = new Database(path, { readonly: true });
    const rows = () => (other.prepare('SELECT count(*) AS n FROM denials').get() as { n: number }).n;
    store.add([denial(), denial()]);
    expect(rows()).toBe(0);
    await new Promise((r) => setTimeout(r, 400));
    expect(rows()).toBe(2);
    store.add([...manyDenials(49)]);
    expect(rows()).toBe(2);
    store.add([denial()]);
    expect(rows()).toBe(52);
    store.add([denial()]);
    store.close();
    expect(rows()).toBe(53);
    other.close();
  });
});

describe('denial store: housekeeping', () => {
  it('removes records older than the retention, at open and when asked, and logs it', async () => {
    const path = freshPath();
    const old = [...manyDenials(100, { end: T0 - 91 * 86_400_000 })];
    const kept = [...manyDenials(100, { end: T0 - 89 * 86_400_000, start: 100 })];
    let store = open(path, { now: () => T0 - 30 * 86_400_000 });
    store.add([...old, ...kept]);
    store.close();
    const lines: { event?: string; reason?: string; records?: number }[] = [];
    const log = { info: (o: object) => lines.push(o), error: (o: object) => lines.push(o) } as never;
    store = open(path, { log });
    await store.idle();
    expect(store.query({ limit: 1000 })).toHaveLength(100);
    expect(store.query({ until: T0 - 90 * 86_400_000 })).toEqual([]);
    expect(store.summary({})).toEqual(bruteSummary(kept));
    expect(lines).toContainEqual(expect.objectContaining({ event: 'denials-pruned', reason: 'age', records: 100 }));
    store.close();
    // Retention is an option: 1 day keeps nothing of these.
    store = open(path, { retentionDays: 1 });
    await store.idle();
    expect(store.query({})).toEqual([]);
    expect(store.summary({})).toEqual(bruteSummary([]));
    store.close();
  });

  it("keeps the database under its size cap, dropping one user's oldest first, and gives the space back", async () => {
    const path = freshPath();
    const cap = 1024 * 1024;
    let store = open(path, { maxBytes: 1024 * 1024 * 1024 });
    // One user's: which user's records go is the next test's.
    const records = [...manyDenials(20_000, { end: T0 - HOUR, stepMs: 50 })].map((r) => ({ ...r, uid: 1000 }));
    store.add(records);
    store.close();
    const before = statSync(path).size;
    expect(before).toBeGreaterThan(3 * cap);
    const lines: { event?: string; reason?: string; records?: number; bytesAfter?: number }[] = [];
    store = open(path, { maxBytes: cap, log: { info: (o: object) => lines.push(o) } as never });
    await store.idle();
    const size = lines.find((l) => l.reason === 'size');
    expect(size?.event).toBe('denials-pruned');
    expect(size!.bytesAfter).toBeLessThanOrEqual(cap);
    const left = store.query({ limit: 1_000_000 });
    expect(left.length).toBe(records.length - size!.records!);
    // The newest are what is left, in one unbroken run.
    const newest = records.slice(records.length - left.length);
    expect(left.map((r) => `${r.address} ${r.lastSeen}`).reverse()).toEqual(newest.map((r) => `${r.address} ${r.lastSeen}`));
    expect(store.summary({})).toEqual(bruteSummary(newest));
    store.close();
    expect(statSync(path).size).toBeLessThanOrEqual(cap + 64 * 1024);
  });

  /** `n` records of `uid` to distinct destinations, the last `end`, one every `stepMs` before it. */
  const flood = (uid: number | undefined, n: number, end: number, stepMs = 10) =>
    [...manyDenials(n, { end, stepMs })].map((r, i) => ({ ...r, uid, address: `10.${(uid ?? 0) & 255}.${(i >> 8) & 255}.${i & 255}` }));
  const uidsLeft = (store: ReturnType<typeof open>) => {
    const left = new Map<number | undefined, number>();
    for (const r of store.query({ limit: 1_000_000 })) left.set(r.uid, (left.get(r.uid) ?? 0) + 1);
    return left;
  };

  it("over the cap, one user's flood evicts its own records: another user's older history stays whole", async () => {
    const path = freshPath();
    const cap = 4 * 1024 * 1024;
    const noSubuids = join(scratch, 'no-subuid');
    writeFileSync(noSubuids, '');
    let store = open(path, { maxBytes: 1024 * 1024 * 1024, subuidFile: noSubuids });
    // The reviewer's case: 200 old records of uid 1001, then uid 1000 floods 20,000 distinct destinations.
    const victim = flood(1001, 200, T0 - 2 * HOUR);
    const flooder = flood(1000, 20_000, T0 - HOUR, 1);
    store.add(victim);
    store.add(flooder);
    store.close();
    const lines: { reason?: string; records?: number; bytesAfter?: number }[] = [];
    store = open(path, { maxBytes: cap, subuidFile: noSubuids, log: { info: (o: object) => lines.push(o) } as never });
    await store.idle();
    const size = lines.find((l) => l.reason === 'size');
    expect(size!.bytesAfter).toBeLessThanOrEqual(cap);
    const left = uidsLeft(store);
    expect(left.get(1001)).toBe(200);
    expect(left.get(1000)).toBe(20_000 - size!.records!);
    // What the flooder keeps are its newest.
    const kept = store.query({ uid: 1000, limit: 1_000_000 }).map((r) => r.lastSeen);
    expect(Math.min(...kept)).toBe(flooder[20_000 - kept.length]!.lastSeen);
    expect(store.summary({})).toEqual(bruteSummary([...victim, ...flooder.slice(20_000 - kept.length)]));
    store.close();
  });

  it("a flood spread over a user's subordinate uids (or from orphaned sockets) counts as one holder's, and is what goes", async () => {
    const path = freshPath();
    const cap = 4 * 1024 * 1024;
    const subuid = join(scratch, 'subuid');
    writeFileSync(subuid, '1000:100000:65536\n');
    let store = open(path, { maxBytes: 1024 * 1024 * 1024, subuidFile: subuid });
    // uid 1001 holds more than any one of the flooder's uids, but less than all of them together.
    const victim = flood(1001, 3000, T0 - 3 * HOUR);
    const spread = Array.from({ length: 1000 }, (_, u) => flood(100_000 + u, 18, T0 - HOUR, 1)).flat();
    const orphans = flood(undefined, 500, T0 - 2 * HOUR);
    store.add(victim);
    store.add(orphans);
    store.add(spread);
    store.close();
    store = open(path, { maxBytes: cap, subuidFile: subuid });
    await store.idle();
    const left = uidsLeft(store);
    expect(left.get(1001)).toBe(3000);
    expect(left.get(undefined)).toBe(500);
    expect([...left.entries()].filter(([uid]) => uid !== undefined && uid >= 100_000).reduce((n, [, c]) => n + c, 0)).toBeLessThan(18_000);
    store.close();
    // Orphaned sockets' records are a holder too: past the cap with them the largest, they go first.
    const orphanPath = freshPath();
    store = open(orphanPath, { maxBytes: 1024 * 1024 * 1024, subuidFile: subuid });
    store.add(victim);
    store.add(flood(undefined, 20_000, T0 - HOUR, 1));
    store.close();
    store = open(orphanPath, { maxBytes: cap, subuidFile: subuid });
    await store.idle();
    expect(uidsLeft(store).get(1001)).toBe(3000);
    expect(uidsLeft(store).get(undefined)).toBeLessThan(20_000);
    store.close();
  });

  it("the size cap's deletes read an index, never the whole table nor a sort of it", () => {
    const path = freshPath();
    open(path).close();
    const db = new Database(path, { readonly: true });
    const plan = (sql: string, ...params: unknown[]) =>
      (db.prepare(`EXPLAIN QUERY PLAN ${sql.replace(/^DELETE FROM denials WHERE id IN \((.*)\)$/, '$1')}`).all(...params) as { detail: string }[])
        .map((row) => row.detail)
        .join('; ');
    expect(plan(OLDEST_OF_UID_SQL, 1000, 500)).toMatch(/SEARCH denials USING (COVERING )?INDEX denials_uid \(uid=\?\)/);
    expect(plan(OLDEST_OF_NO_UID_SQL, 500)).toMatch(/SCAN denials USING (COVERING )?INDEX denials_no_uid/);
    expect(plan(OLDEST_OF_UID_SQL, 1000, 500) + plan(OLDEST_OF_NO_UID_SQL, 500)).not.toContain('TEMP B-TREE');
    db.close();
  });

  it('a cap below what an empty database takes removes every record and stops there', async () => {
    const path = freshPath();
    const store = open(path, { maxBytes: 1024 * 1024 * 1024 });
    store.add([...manyDenials(1500)]);
    store.close();
    const tiny = open(path, { maxBytes: 1 });
    await tiny.idle();
    expect(tiny.query({})).toEqual([]);
    expect(tiny.summary({})).toEqual(bruteSummary([]));
    tiny.add([denial()]);
    tiny.flush();
    expect(tiny.query({})).toHaveLength(1);
    tiny.close();
  });

  it('pruning never holds the event loop: open returns before it, and it deletes in slices of at most SLICE_ROWS.max rows, giving the loop back between them', async () => {
    const path = freshPath();
    let store = open(path, { maxBytes: 1024 * 1024 * 1024 });
    const records = [...manyDenials(40_000, { end: T0 - HOUR, stepMs: 50 })];
    store.add(records);
    store.close();
    // Turns of the event loop, counted (not timed: a loaded machine stretches time, not the count): one setImmediate a turn.
    let turns = 0;
    let counting = true;
    const count = () => {
      turns++;
      if (counting) setImmediate(count);
    };
    setImmediate(count);
    const lines: { reason?: string; records?: number; turns?: number }[] = [];
    store = open(path, {
      maxBytes: 1024 * 1024,
      retentionDays: 1,
      now: () => T0 + 86_400_000 - 30 * 60_000,
      // The turns the loop had from open until the age prune was done.
      log: { info: (o: object) => lines.push({ ...o, turns }) } as never,
    });
    // Nothing is pruned yet: open does not wait on housekeeping.
    expect(lines).toEqual([]);
    await store.idle();
    counting = false;
    // Every record was past its age (40 000 × 50 ms before T0 − 1 h, a day and 30 min ago at most).
    const age = lines.find((line) => line.reason === 'age');
    expect(age).toMatchObject({ reason: 'age', records: records.length });
    expect(store.query({})).toEqual([]);
    // At most SLICE_ROWS.max rows per DELETE with a turn of the loop before each: 40 000 rows are at least 8 turns (one synchronous DELETE: 2).
    expect(age!.turns).toBeGreaterThanOrEqual(Math.ceil(records.length / SLICE_ROWS.max));
    store.close();
  });

  it('idOf gives the row id each added record was written to, once its batch is written', () => {
    const store = open(freshPath(), { flushIntervalMs: 60_000 });
    const records = [...manyDenials(5)];
    store.add(records);
    expect(records.map((r) => store.idOf(r))).toEqual([undefined, undefined, undefined, undefined, undefined]);
    store.flush();
    const ids = records.map((r) => store.idOf(r)!);
    expect(new Set(ids).size).toBe(5);
    records.forEach((r, i) => expect(store.get(ids[i]!)).toMatchObject({ address: r.address, lastSeen: r.lastSeen }));
    // A copy is another record: only the object handed to add has an id.
    expect(store.idOf({ ...records[0]! })).toBeUndefined();
    store.close();
  });

  it('prunes by itself on its timer', async () => {
    let clock = T0;
    const store = open(freshPath(), { pruneIntervalMs: 100, retentionDays: 1, now: () => clock });
    store.add([denial({ lastSeen: T0 - HOUR })]);
    store.flush();
    expect(store.query({})).toHaveLength(1);
    clock = T0 + 86_400_000;
    await new Promise((r) => setTimeout(r, 300));
    expect(store.query({})).toHaveLength(0);
    store.close();
  });
});

describe('denial store: files, modes, schema', () => {
  it('0640 root:GROUP for the database, its -wal and -shm; 2750 for its directory; the state directory searchable only', () => {
    const { grp } = ensureTestUsers();
    const path = freshPath();
    const store = open(path, { group: grp.name });
    store.add([denial()]);
    store.flush();
    for (const file of [path, `${path}-wal`, `${path}-shm`]) {
      const st = statSync(file);
      expect([file, st.mode & 0o7777, st.uid, st.gid]).toEqual([file, 0o640, 0, grp.gid]);
    }
    const dir = statSync(join(path, '..'));
    expect([dir.mode & 0o7777, dir.uid, dir.gid]).toEqual([0o2750, 0, grp.gid]);
    expect(statSync(join(path, '..', '..')).mode & 0o007).toBe(0o001);
    store.close();
    // Without the group (or with a group that does not exist): root's alone.
    const lone = freshPath();
    open(lone, { group: 'egd-no-such-group' }).close();
    expect([statSync(lone).mode & 0o777, statSync(lone).gid]).toEqual([0o640, 0]);
  });

  it(`a newer schema is refused and left untouched; an empty file becomes version ${SCHEMA_VERSION}`, () => {
    const path = freshPath();
    open(path).close();
    const db = new Database(path);
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    const bytes = readFileSync(path);
    expect(() => open(path)).toThrow(expect.objectContaining({ code: ErrorCode.DenialStore, details: ['newer-schema'] }));
    expect(readFileSync(path).equals(bytes)).toBe(true);
    const empty = freshPath();
    open(empty).close();
    const check = new Database(empty, { readonly: true });
    expect(check.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    check.close();
  });
});

describe('denial store: record ids', () => {
  it('never gives an id twice, also once retention emptied the store (an agent allows from a record by its id)', async () => {
    const path = freshPath();
    let store = open(path, { now: () => T0 - 30 * 86_400_000 });
    store.add([...manyDenials(5, { end: T0 - 30 * 86_400_000 })]);
    store.flush();
    const before = store.query({ limit: 10 }).map((r) => r.id);
    store.close();
    store = open(path, { retentionDays: 1 });
    await store.idle();
    expect(store.query({})).toEqual([]);
    store.add([denial({ firstSeen: T0, lastSeen: T0 })]);
    store.flush();
    const [after] = store.query({}).map((r) => r.id);
    expect(after).toBeGreaterThan(Math.max(...before));
    store.close();
  });

  it('a version 1 store is migrated with its records, ids and rollup, and gives new ids after its highest; its names are of unknown asker', () => {
    const path = freshPath();
    open(path).close();
    rmSync(path);
    const v1 = new Database(path);
    v1.exec(MIGRATIONS[0]!);
    v1.pragma('user_version = 1');
    const insert = v1.prepare(
      "INSERT INTO denials (id, first_seen, last_seen, count, short_id, protocol, family, address, addr, app, name) VALUES (?, ?, ?, ?, 'r1', 'tcp', 4, ?, ?, 'firefox', ?)",
    );
    for (const [id, count] of [
      [3, 2],
      [7, 5],
      [9, 1],
    ] as const)
      insert.run(id, T0, T0, count, `192.0.2.${id}`, Buffer.from([192, 0, 2, id]), id === 7 ? 'seven.example' : null);
    v1.close();
    // egressctl reads it as it is, before egressd (restarted after an upgrade) migrates it.
    const reader = openDenialReader(path);
    expect(reader.query({}).map((r) => r.id)).toEqual([9, 7, 3]);
    // Who looked a name up was not kept then: never taken as the sender's own (no alert shows it, no Allow writes it).
    expect(reader.get(7)).toMatchObject({ name: 'seven.example', nameAskedBy: 'others' });
    reader.close();
    const store = open(path);
    expect(store.query({ limit: 10 }).map((r) => [r.id, r.count, r.address])).toEqual([
      [9, 1, '192.0.2.9'],
      [7, 5, '192.0.2.7'],
      [3, 2, '192.0.2.3'],
    ]);
    expect(store.summary({})).toMatchObject({ records: 3, packets: 8, apps: [{ key: 'firefox', count: 8 }] });
    store.add([denial({ firstSeen: T0, lastSeen: T0 })]);
    store.flush();
    expect(Math.max(...store.query({}).map((r) => r.id))).toBe(10);
    expect(store.get(7)).toMatchObject({ name: 'seven.example', nameAskedBy: 'others' });
    expect(store.get(9)).toMatchObject({ name: undefined, nameAskedBy: undefined });
    store.add([denial({ lastSeen: T0, name: 'own.example', nameAskedBy: 'sender' }), denial({ lastSeen: T0, name: 'theirs.example', nameAskedBy: 'others' })]);
    store.flush();
    expect(store.query({ limit: 2 }).map((r) => [r.name, r.nameAskedBy])).toEqual([
      ['theirs.example', 'others'],
      ['own.example', 'sender'],
    ]);
    store.close();
    const check = new Database(path, { readonly: true });
    expect(check.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
    expect((check.prepare("SELECT sql FROM sqlite_master WHERE name = 'denials'").get() as { sql: string }).sql).toContain('AUTOINCREMENT');
    // The counts the size cap reads: the v1 rows (no uid) counted at migration, the new ones by the triggers.
    expect(check.prepare('SELECT uid, records FROM records_by_uid ORDER BY uid').all()).toEqual([
      { uid: -1, records: 3 },
      { uid: 1000, records: 3 },
    ]);
    check.close();
  });
});

describe('denial store: damage', () => {
  const damaged = (make: (path: string) => void) => {
    const path = freshPath();
    make(path);
    const original = readFileSync(path);
    const errors: EgressError[] = [];
    const store = open(path, { onError: (e) => errors.push(e) });
    store.add([denial()]);
    store.flush();
    expect(store.query({})).toHaveLength(1);
    store.close();
    expect(errors.map((e) => e.code)).toEqual([ErrorCode.DenialStore]);
    const aside = readdirSync(join(path, '..')).filter((f) => /^denials\.sqlite\.corrupt-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ$/.test(f));
    expect(aside).toHaveLength(1);
    expect(errors[0]!.message).toContain(aside[0]);
    expect(readFileSync(join(path, '..', aside[0]!)).equals(original)).toBe(true);
  };

  it('garbage bytes: kept aside with a timestamp, a fresh database beside it, reported as EGD_DENIAL_STORE', () => {
    damaged((path) => {
      open(path).close();
      writeFileSync(path, Buffer.alloc(64 * 1024, 0x5a));
    });
  });

  it('a truncated file too large for quick_check at open: the same, from its size', () => {
    const path = freshPath();
    const store = open(path);
    store.add([...manyDenials(5_000)]);
    store.close();
    truncateSync(path, Math.floor(statSync(path).size / 2) + 100);
    const original = readFileSync(path);
    const errors: EgressError[] = [];
    open(path, { quickCheckMaxBytes: 4096, onError: (e) => errors.push(e) }).close();
    expect(errors.map((e) => e.code)).toEqual([ErrorCode.DenialStore]);
    // SQLite meets the missing pages itself (the schema, the housekeeping's index walk) or the size check does: either way, at open.
    expect(errors[0]!.message).toMatch(/malformed|truncated/);
    const aside = readdirSync(join(path, '..')).filter((f) => f.startsWith('denials.sqlite.corrupt-'));
    expect(aside).toHaveLength(1);
    expect(readFileSync(join(path, '..', aside[0]!)).equals(original)).toBe(true);
  });

  it('a fresh database started beside a damaged one gives no id the damaged one gave: an agent\'s "Allow" on a notification from before reaches no record', () => {
    const path = freshPath();
    const before = open(path);
    before.add([denial(), denial(), denial()]);
    before.flush();
    const oldIds = before.query({}).map((r) => r.id);
    expect(oldIds.sort()).toEqual([1, 2, 3]);
    before.close();
    writeFileSync(path, Buffer.alloc(64 * 1024, 0x5a));
    const at = Date.UTC(2026, 11, 5, 12);
    const after = open(path, { now: () => at, onError: () => undefined });
    after.add([denial(), denial()]);
    after.flush();
    const newIds = after
      .query({})
      .map((r) => r.id)
      .sort();
    expect(newIds).toEqual([at * 1000 + 1, at * 1000 + 2]);
    for (const id of oldIds) expect(after.get(id)).toBeUndefined();
    after.close();
    // Reopened (not damaged), it goes on from where it was.
    const again = open(path, { now: () => at + 1 });
    again.add([denial()]);
    again.flush();
    expect(Math.max(...again.query({}).map((r) => r.id))).toBe(at * 1000 + 3);
    again.close();
  });

  it('a truncated file: the same', () => {
    damaged((path) => {
      const store = open(path);
      store.add([...manyDenials(20_000)]);
      store.close();
      truncateSync(path, Math.floor(statSync(path).size / 2) + 100);
    });
  });

  it('a database that cannot be written is an EGD_DENIAL_STORE error to the caller (nothing is moved)', () => {
    // A regular file where the directory should be: mkdir fails.
    const base = join(scratch, `s${++n}`);
    writeFileSync(base, 'not a directory');
    expect(() => open(denialStorePath(base))).toThrow(expect.objectContaining({ code: ErrorCode.DenialStore }));
    // Another user, as an unprivileged daemon would be: the root-owned store cannot be opened for writing.
    const { app1 } = ensureTestUsers();
    const path = freshPath();
    open(path).close();
    const child = spawnSync(
      'setpriv',
      [
        '--reuid',
        String(app1.uid),
        '--regid',
        String(app1.gid),
        '--clear-groups',
        process.execPath,
        '--import',
        'tsx',
        '-e',
        `
        import('${join(import.meta.dirname, '../../src/denials/store.ts')}').then((m) => {
          try { m.openDenialStore(${JSON.stringify(path)}, { group: null }); console.log('opened'); }
          catch (e) { console.log(e.code, e.message); }
        });`,
      ],
      { encoding: 'utf8', cwd: join(import.meta.dirname, '../..') },
    );
    expect(child.stdout).toMatch(/^EGD_DENIAL_STORE denial store .*: cannot be opened for writing: /);
    expect(readdirSync(join(path, '..'))).toEqual(['denials.sqlite']);
  });
});

describe('denial store: SIGKILL mid-write', () => {
  it('the database is intact and loses at most the last unflushed batch', async () => {
    const path = freshPath();
    const batch = 500;
    const { reported, signal } = await killWriterMidWrite('store-writer.ts', path, ['200', String(batch)], 30_000);
    expect(signal).toBe('SIGKILL');
    expect(existsSync(`${path}-wal`)).toBe(true);
    const errors: EgressError[] = [];
    const store = open(path, { onError: (e) => errors.push(e) });
    expect(errors).toEqual([]);
    const { integrity, seqs } = writtenSequence(path);
    expect(integrity).toEqual([{ integrity_check: 'ok' }]);
    // A prefix of what was added, in order, with nothing missing inside it …
    expect(seqs.every((s, i) => s === i)).toBe(true);
    // … and short of what the writer had handed over by at most one batch.
    expect(seqs.length).toBeGreaterThanOrEqual(reported - (batch - 1));
    expect(store.summary({}).records).toBe(seqs.length);
    store.close();
  });
});

describe('keepDenials', () => {
  it('every record reaches the journal and the store; a failing store is logged once and the journal goes on', async () => {
    const { keepDenials } = await import('../../src/denials/keep.js');
    let listener: ((r: DenialRecord) => void) | undefined;
    const source = {
      subscribe: (l: (r: DenialRecord) => void) => {
        listener = l;
        return () => (listener = undefined);
      },
    };
    const journaled: DenialRecord[] = [];
    const logged: { event?: string }[] = [];
    const store = open();
    const stop = keepDenials(source, {
      store,
      journal: { via: 'stdout', dropped: 0, write: (r) => journaled.push(r), close: () => undefined },
      log: { error: (o: object) => logged.push(o) } as never,
    });
    listener!(denial({ port: 1 }));
    listener!(denial({ port: 2 }));
    store.flush();
    expect(store.query({}).map((r) => r.port)).toEqual([2, 1]);
    store.close();
    listener!(denial({ port: 3 }));
    listener!(denial({ port: 4 }));
    expect(journaled.map((r) => r.port)).toEqual([1, 2, 3, 4]);
    expect(logged).toEqual([expect.objectContaining({ event: 'denial-store-failed', code: ErrorCode.DenialStore })]);
    stop();
    expect(listener).toBeUndefined();
  });
});
