import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { afterAll, describe, expect, it } from 'vitest';
import { ErrorCode, type EgressError } from '../../src/errors.js';
import { denialStorePath, openDenialStore, SCHEMA_VERSION } from '../../src/denials/store.js';
import { startDenialStore, type WorkerStoreOptions } from '../../src/denials/store-worker.js';
import { killWriterMidWrite, writtenSequence } from './killed-writer.js';
import { denial, manyDenials } from './store-records.js';

/**
 * The store as the daemon runs it: the database in a worker thread, `add`
 * handed over without waiting, a bounded queue that drops and counts, and
 * every read answered by the worker. The database's own behaviour (SQL,
 * rollup, pruning) is store.test.ts's; here, what crossing the thread must
 * keep.
 */
const scratch = mkdtempSync(join(tmpdir(), 'egd-store-worker-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));
let n = 0;
const freshPath = () => denialStorePath(join(scratch, `s${++n}`));
const start = (path = freshPath(), options: WorkerStoreOptions = {}) => startDenialStore(path, { group: null, ...options });
const rowsIn = (path: string): number => {
  const db = new Database(path, { readonly: true });
  try {
    return (db.prepare('SELECT count(*) AS n FROM denials').get() as { n: number }).n;
  } finally {
    db.close();
  }
};
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('denial store in its worker thread', () => {
  it('add returns before anything is written; rows appear within the flush interval, or at once when a batch is full; each record gets its row id', async () => {
    const path = freshPath();
    const store = await start(path, { flushIntervalMs: 200, batchSize: 50 });
    try {
      const two = [denial({ port: 1 }), denial({ port: 2 })];
      store.add(two);
      expect(rowsIn(path)).toBe(0);
      expect(store.counters()).toMatchObject({ queued: 2, written: 0 });
      for (let i = 0; i < 100 && rowsIn(path) < 2; i++) await sleep(20);
      expect(rowsIn(path)).toBe(2);
      // A full batch does not wait for the interval: with a long one, 50 rows still come at once.
      await store.close();
      const batched = await start(path, { flushIntervalMs: 60_000, batchSize: 50 });
      // The prune at open writes what is queued before it looks: let it finish first.
      await batched.idle();
      batched.add([...manyDenials(49)]);
      await sleep(300);
      expect(rowsIn(path)).toBe(2);
      const fiftieth = denial({ port: 50 });
      batched.add([fiftieth]);
      for (let i = 0; i < 250 && rowsIn(path) < 52; i++) await sleep(20);
      expect(rowsIn(path)).toBe(52);
      expect(batched.idOf(fiftieth)).toBeGreaterThan(0);
      expect((await batched.get(batched.idOf(fiftieth)!))?.port).toBe(50);
      // A copy is another record: only the object handed to add has an id.
      expect(batched.idOf({ ...fiftieth })).toBeUndefined();
      // close writes what is still queued.
      batched.add([denial({ port: 53 })]);
      await batched.close();
      expect(rowsIn(path)).toBe(53);
    } finally {
      await store.close();
    }
  });

  it('flush resolves once everything added before it is written, with every id known', async () => {
    const store = await start(freshPath(), { flushIntervalMs: 60_000 });
    const records = [...manyDenials(2_500)];
    store.add(records);
    expect(records.some((r) => store.idOf(r) !== undefined)).toBe(false);
    await store.flush();
    const ids = records.map((r) => store.idOf(r));
    expect(ids.every((id) => typeof id === 'number')).toBe(true);
    expect(new Set(ids).size).toBe(records.length);
    expect(store.counters()).toMatchObject({ queued: 0, written: 2_500, dropped: 0, failed: 0 });
    await store.close();
  });

  it('queries, get and summary answer as the database does; bad filters reject with EGD_DENIAL_FILTER naming the field', async () => {
    const path = freshPath();
    const records = [...manyDenials(3_000, { apps: 13, dests: 300, rules: 17 })];
    const store = await start(path);
    store.add(records);
    await store.flush();
    const direct = openDenialStore(path, { group: null });
    try {
      for (const filter of [{}, { app: 'app3' }, { dest: '198.51.0.0/16' }, { dest: '*.tracker7.example' }, { uid: 1002, limit: 10 }, { rule: 'r00000005' }]) {
        expect(await store.query(filter), JSON.stringify(filter)).toEqual(direct.query(filter));
        expect(await store.summary(filter), JSON.stringify(filter)).toEqual(direct.summary(filter));
      }
      const one = direct.query({ limit: 1 })[0]!;
      expect(await store.get(one.id)).toEqual(one);
      expect(await store.get(999_999)).toBeUndefined();
    } finally {
      direct.close();
    }
    const fails = async (call: Promise<unknown>, field: string) => {
      const error = (await call.then(
        () => undefined,
        (e: unknown) => e,
      )) as EgressError | undefined;
      expect(error?.code, field).toBe(ErrorCode.DenialFilter);
      expect(error?.details[0]).toBe(field);
      expect(error?.message).toMatch(new RegExp(`^${field}: `));
    };
    await fails(store.query({ dest: '300.1.2.3' }), 'dest');
    await fails(store.query({ uid: -1 }), 'uid');
    await fails(store.query({ limit: 0 }), 'limit');
    await fails(store.summary({ since: Number.NaN }), 'since');
    await fails(store.get(-1), 'id');
    expect(await store.query({ app: "x' OR '1'='1" })).toEqual([]);
    await store.close();
    await expect(store.query({})).rejects.toMatchObject({ code: ErrorCode.DenialStore });
    expect(() => store.add([denial()])).toThrow(expect.objectContaining({ code: ErrorCode.DenialStore }));
  });

  it('the queue is bounded: past maxQueued records add drops and counts them (and their packets), and every record handed over is written or counted', async () => {
    const path = freshPath();
    // Batches bigger than the bound, a long interval: nothing is written before the flush, so the bound alone decides.
    const store = await start(path, { maxQueued: 300, batchSize: 5_000, flushIntervalMs: 60_000 });
    const records = [...manyDenials(5_000)];
    const packets = records.reduce((s, r) => s + r.count, 0);
    for (let i = 0; i < records.length; i += 100) store.add(records.slice(i, i + 100));
    let c = store.counters();
    expect(c.queued).toBe(300);
    expect(c.queuedPeak).toBe(300);
    expect(c.dropped).toBe(4_700);
    // The first 300 were taken, the rest dropped: their packets are what was counted.
    expect(c.droppedEvents).toBe(records.slice(300).reduce((s, r) => s + r.count, 0));
    await store.flush();
    c = store.counters();
    expect(c).toMatchObject({ queued: 0, written: 300, dropped: 4_700, failed: 0 });
    const summary = await store.summary({});
    expect(summary.records).toBe(300);
    expect(summary.packets + c.droppedEvents + c.failedEvents).toBe(packets);
    // Once written, there is room again.
    store.add([denial()]);
    expect(store.counters().dropped).toBe(4_700);
    await store.close();
    expect(rowsIn(path)).toBe(301);
  });

  it('housekeeping runs in the worker and can be asked for', async () => {
    const path = freshPath();
    const old = Date.now() - 100 * 86_400_000;
    const store = await start(path, { flushIntervalMs: 60_000 });
    await store.idle();
    store.add([...manyDenials(200, { end: old }), ...manyDenials(50, { end: Date.now(), start: 200 })]);
    await store.flush();
    expect(await store.prune()).toEqual({ age: 200, size: 0 });
    expect((await store.summary({})).records).toBe(50);
    await store.close();
  });

  it('a damaged database is kept aside and a fresh one started, reported through onError as EGD_DENIAL_STORE', async () => {
    const path = freshPath();
    openDenialStore(path, { group: null }).close();
    writeFileSync(path, Buffer.alloc(64 * 1024, 0x5a));
    const original = readFileSync(path);
    const errors: EgressError[] = [];
    const store = await start(path, { onError: (e) => errors.push(e) });
    store.add([denial()]);
    await store.flush();
    expect(await store.query({})).toHaveLength(1);
    await store.close();
    expect(errors.map((e) => e.code)).toEqual([ErrorCode.DenialStore]);
    const aside = readdirSync(join(path, '..')).filter((f) => /^denials\.sqlite\.corrupt-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ$/.test(f));
    expect(aside).toHaveLength(1);
    expect(errors[0]!.message).toContain(aside[0]);
    expect(readFileSync(join(path, '..', aside[0]!)).equals(original)).toBe(true);
  });

  it('a store that cannot be opened rejects start with EGD_DENIAL_STORE (a newer schema, left untouched; no directory)', async () => {
    const path = freshPath();
    openDenialStore(path, { group: null }).close();
    const db = new Database(path);
    db.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
    db.close();
    const bytes = readFileSync(path);
    await expect(start(path)).rejects.toMatchObject({ code: ErrorCode.DenialStore, details: ['newer-schema'] });
    expect(readFileSync(path).equals(bytes)).toBe(true);
    const base = join(scratch, `s${++n}`);
    writeFileSync(base, 'not a directory');
    await expect(start(denialStorePath(base))).rejects.toMatchObject({ code: ErrorCode.DenialStore });
  });

  it('a worker that dies (here: out of its heap on a huge query) fails the store, not the process: the call and later ones reject, it is reported once, later records are counted dropped', async () => {
    const path = freshPath();
    const direct = openDenialStore(path, { group: null });
    direct.add([...manyDenials(60_000)]);
    direct.close();
    const errors: EgressError[] = [];
    const store = await start(path, { heapMb: 16, onError: (e) => errors.push(e) });
    expect(await store.query({ limit: 1 })).toHaveLength(1);
    await expect(store.query({ limit: 1_000_000 })).rejects.toMatchObject({ code: ErrorCode.DenialStore });
    expect(store.failed).toBe(true);
    expect(errors.map((e) => e.code)).toEqual([ErrorCode.DenialStore]);
    await expect(store.summary({})).rejects.toMatchObject({ code: ErrorCode.DenialStore });
    store.add([denial({ count: 4 })]);
    expect(store.counters()).toMatchObject({ dropped: 1, droppedEvents: 4 });
    await store.close();
    // The database is as it was: the keeper's retry opens it again.
    const again = await start(path);
    expect((await again.summary({})).records).toBe(60_000);
    await again.close();
  });

  it('SIGKILL mid-write: the database is intact and holds every record handed over but at most the queue bound', async () => {
    const path = freshPath();
    const maxQueued = 1000;
    const { reported, signal } = await killWriterMidWrite('store-worker-writer.ts', path, ['200', '500', String(maxQueued)], 20_000);
    expect(signal).toBe('SIGKILL');
    expect(existsSync(`${path}-wal`)).toBe(true);
    const errors: EgressError[] = [];
    const store = await start(path, { onError: (e) => errors.push(e) });
    expect(errors).toEqual([]);
    const { integrity, seqs } = writtenSequence(path);
    expect(integrity).toEqual([{ integrity_check: 'ok' }]);
    // A prefix of what was added, in order, with nothing missing inside it (the writer never outran the bound: nothing was dropped) …
    expect(seqs.every((s, i) => s === i)).toBe(true);
    // … and short of what the writer had handed over by at most what the queue holds.
    expect(seqs.length).toBeGreaterThanOrEqual(reported - maxQueued);
    expect((await store.summary({})).records).toBe(seqs.length);
    await store.close();
  });
});
