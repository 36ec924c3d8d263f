/**
 * The denial store off the daemon's thread: the SQLite database (store.ts)
 * runs in a worker thread (store-thread.ts), and this is its face on the
 * daemon's side — the DenialStore the keeper and D-Bus use.
 *
 * - `add` is fire-and-forget: records are posted to the worker once per
 *   turn of the loop (or at once, `postBatch` at a time), where the
 *   database batches them as before (≤ batchSize or flushIntervalMs). A
 *   SIGKILL loses what the worker had not committed: at most the last
 *   flush interval, plus the turn not yet posted.
 * - The queue is bounded: at most `maxQueued` records handed over and not
 *   yet written. Beyond that (a flood of new destinations writes faster
 *   than SQLite does, ~25k records per CPU-second) records are dropped and
 *   counted (`counters().dropped`, with their packets in `droppedEvents`) —
 *   so a flood costs stored records, never the daemon's memory, and the
 *   reader and the resolver beside it keep their thread.
 * - Everything that reads waits for the worker: query, get, summary, flush.
 *   A filter is checked here first, so bad input fails at once with the
 *   field named, as before.
 * - A worker that dies (out of memory, a bug) fails the store: calls waiting
 *   are answered with EGD_DENIAL_STORE, it is reported once (onError), and
 *   what it held is counted failed; records added after are dropped and
 *   counted. The keeper opens a fresh one on its retry timer.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { Logger } from 'pino';
import { EgressError, ErrorCode, type ErrorCode as Code } from '../errors.js';
import type { DenialRecord } from './record.js';
import {
  filterSql,
  type DenialFilter,
  type DenialStore,
  type DenialStoreCounters,
  type DenialStoreOptions,
  type DenialSummary,
  type StoredDenial,
} from './store.js';

export interface WorkerStoreOptions extends Pick<
  DenialStoreOptions,
  'retentionDays' | 'maxBytes' | 'flushIntervalMs' | 'batchSize' | 'pruneIntervalMs' | 'group' | 'quickCheckMaxBytes' | 'subuidFile'
> {
  readonly log?: Logger;
  /** Problems found where no caller waits (a refused batch, a database replaced at open, the worker lost); default: logged. */
  readonly onError?: (error: EgressError) => void;
  /** Records handed over and not yet written, at most (default 10,000); beyond it `add` drops and counts. */
  readonly maxQueued?: number;
  /** Records posted to the worker in one message at most (default 1,000). */
  readonly postBatch?: number;
  /** How long close waits for the worker to write what it holds before it is stopped (default 30 s). */
  readonly closeTimeoutMs?: number;
  /** The worker's old-generation heap at most, in MB (default 64): past it the worker dies and the store fails, the daemon does not. */
  readonly heapMb?: number;
}

/** The worker's housekeeping, asked for from here (tests, benchmarks). */
export interface WorkerHouseKeeping {
  prune(): Promise<{ age: number; size: number }>;
  idle(): Promise<void>;
  /** True once the worker is gone without close (the store then only counts). */
  readonly failed: boolean;
}

// The messages between the two threads (store-thread.ts imports these types).
export interface WireError {
  readonly code?: string;
  readonly message: string;
  readonly details: readonly string[];
}
export type StoreCall =
  | { readonly kind: 'flush' | 'prune' | 'idle' | 'close' }
  | { readonly kind: 'query' | 'summary'; readonly filter: DenialFilter }
  | { readonly kind: 'get'; readonly id: number };
export type ToThread =
  { readonly t: 'add'; readonly records: readonly DenialRecord[] } | { readonly t: 'call'; readonly seq: number; readonly call: StoreCall };
export type FromThread =
  | { readonly t: 'opened' }
  | { readonly t: 'open-failed'; readonly error: WireError }
  | { readonly t: 'written'; readonly ids: Float64Array }
  | { readonly t: 'failed'; readonly n: number }
  | { readonly t: 'error'; readonly error: WireError }
  | { readonly t: 'log'; readonly level: 'info' | 'warn' | 'error'; readonly obj: object; readonly msg?: string }
  | { readonly t: 'done'; readonly seq: number; readonly value?: unknown; readonly error?: WireError };
export interface ThreadData {
  readonly path: string;
  readonly options: Omit<WorkerStoreOptions, 'log' | 'onError' | 'maxQueued' | 'postBatch' | 'closeTimeoutMs' | 'heapMb'>;
}

export const WORKER_DEFAULTS = { maxQueued: 10_000, postBatch: 1000, closeTimeoutMs: 30_000, heapMb: 64 } as const;

function unwire(error: WireError): EgressError {
  const known = Object.values(ErrorCode) as string[];
  const code = (error.code !== undefined && known.includes(error.code) ? error.code : ErrorCode.DenialStore) as Code;
  return new EgressError(code, error.message, { details: error.details });
}

/**
 * Where the worker's entry is: beside this file — store-thread.js once built
 * (dist/). Run from the sources (tsx, vitest), there is only
 * store-thread.ts, and a worker does not inherit tsx's loader (Node 20
 * starts the entry before `--import` hooks): a two-line shim registers tsx
 * in the worker first.
 */
function threadEntry(): { entry: URL | string; eval: boolean } {
  const built = new URL('./store-thread.js', import.meta.url);
  if (existsSync(fileURLToPath(built))) return { entry: built, eval: false };
  // tsx's ESM entry (the require condition's register() hooks require only).
  const tsx = pathToFileURL(join(dirname(createRequire(import.meta.url).resolve('tsx/package.json')), 'dist/esm/api/index.mjs')).href;
  const source = new URL('./store-thread.ts', import.meta.url).href;
  return { entry: `import(${JSON.stringify(tsx)}).then((tsx) => { tsx.register(); return import(${JSON.stringify(source)}); });`, eval: true };
}

/** A FIFO of the records posted and not yet written, in the order the worker writes them. */
class RecordQueue {
  private chunks: DenialRecord[][] = [];
  private head = 0;
  length = 0;
  push(records: DenialRecord[]): void {
    if (records.length === 0) return;
    this.chunks.push(records);
    this.length += records.length;
  }
  /** Takes the next `n`, calling `each` with each and its index. */
  take(n: number, each: (record: DenialRecord, i: number) => void): void {
    for (let i = 0; i < n && this.length > 0; i++) {
      const chunk = this.chunks[0]!;
      each(chunk[this.head]!, i);
      this.head += 1;
      this.length -= 1;
      if (this.head === chunk.length) {
        this.chunks.shift();
        this.head = 0;
      }
    }
  }
}

/** Starts the worker and opens the database there; rejects as openDenialStore throws (EGD_DENIAL_STORE: unwritable, newer schema). */
export function startDenialStore(path: string, options: WorkerStoreOptions = {}): Promise<DenialStore & WorkerHouseKeeping> {
  const maxQueued = options.maxQueued ?? WORKER_DEFAULTS.maxQueued;
  const postBatch = options.postBatch ?? WORKER_DEFAULTS.postBatch;
  for (const [name, value] of Object.entries({ maxQueued, postBatch }))
    if (!(Number.isSafeInteger(value) && value > 0))
      throw new EgressError(ErrorCode.Usage, `denial store: ${name} must be a positive whole number, not ${String(value)}`);
  const log = options.log;
  const report =
    options.onError ??
    ((error: EgressError) =>
      log?.error({ event: 'denial-store-failed', code: error.code, error: error.message }, 'the denial store failed; enforcement goes on'));
  const threadOptions: Record<string, unknown> = {};
  for (const key of ['retentionDays', 'maxBytes', 'flushIntervalMs', 'batchSize', 'pruneIntervalMs', 'group', 'quickCheckMaxBytes', 'subuidFile'] as const)
    if (options[key] !== undefined) threadOptions[key] = options[key];
  const entry = threadEntry();
  const data: ThreadData = { path, options: threadOptions };
  const worker = new Worker(entry.entry, {
    workerData: data,
    eval: entry.eval,
    // Its own heap, bounded: the queue bounds what it holds, and a runaway query fails the store, not the daemon.
    resourceLimits: { maxOldGenerationSizeMb: options.heapMb ?? WORKER_DEFAULTS.heapMb, maxYoungGenerationSizeMb: 8 },
    stdout: false,
    stderr: false,
  });

  let buffer: DenialRecord[] = [];
  const posted = new RecordQueue();
  let posting = false;
  const counts = { queuedPeak: 0, written: 0, dropped: 0, droppedEvents: 0, failed: 0, failedEvents: 0 };
  // Weak: a record's id lives as long as someone (the D-Bus signal waiting for it) holds the record.
  const ids = new WeakMap<DenialRecord, number>();
  const calls = new Map<number, { resolve: (value: unknown) => void; reject: (error: unknown) => void }>();
  let seq = 0;
  let state: 'opening' | 'open' | 'closing' | 'closed' | 'failed' = 'opening';

  const queued = (): number => buffer.length + posted.length;
  const closedError = (): EgressError =>
    new EgressError(ErrorCode.DenialStore, state === 'failed' ? `denial store ${path}: its worker stopped` : `denial store ${path}: closed`);

  const post = (): void => {
    posting = false;
    if (buffer.length === 0 || state !== 'open') return;
    const records = buffer;
    buffer = [];
    worker.postMessage({ t: 'add', records } satisfies ToThread);
    posted.push(records);
  };

  const call = <T>(what: StoreCall): Promise<T> => {
    if (state !== 'open') return Promise.reject(closedError());
    // What was added before this call reaches the worker before it.
    post();
    const id = ++seq;
    return new Promise<T>((resolve, reject) => {
      calls.set(id, { resolve: resolve as (value: unknown) => void, reject });
      worker.postMessage({ t: 'call', seq: id, call: what } satisfies ToThread);
    });
  };

  /** The worker is gone without close: everything it held is lost, and counted. */
  const fail = (why: string): void => {
    if (state === 'closed' || state === 'failed') return;
    const wasOpen = state === 'open';
    state = 'failed';
    for (const r of buffer) {
      counts.failed += 1;
      counts.failedEvents += r.count;
    }
    buffer = [];
    posted.take(posted.length, (r) => {
      counts.failed += 1;
      counts.failedEvents += r.count;
    });
    const error = new EgressError(ErrorCode.DenialStore, `denial store ${path}: ${why}`);
    for (const waiting of calls.values()) waiting.reject(error);
    calls.clear();
    if (wasOpen) report(error);
    else rejectOpen(error);
  };

  let resolveOpen!: () => void;
  let rejectOpen!: (error: EgressError) => void;
  const opened = new Promise<void>((resolve, reject) => {
    resolveOpen = resolve;
    rejectOpen = reject;
  });

  worker.on('message', (message: FromThread) => {
    switch (message.t) {
      case 'opened':
        state = 'open';
        resolveOpen();
        return;
      case 'open-failed':
        state = 'closed';
        void worker.terminate();
        rejectOpen(unwire(message.error));
        return;
      case 'written':
        counts.written += message.ids.length;
        posted.take(message.ids.length, (record, i) => ids.set(record, message.ids[i]!));
        return;
      case 'failed':
        posted.take(message.n, (record) => {
          counts.failed += 1;
          counts.failedEvents += record.count;
        });
        return;
      case 'error':
        report(unwire(message.error));
        return;
      case 'log':
        log?.[message.level](message.obj, message.msg);
        return;
      case 'done': {
        const waiting = calls.get(message.seq);
        calls.delete(message.seq);
        if (message.error) waiting?.reject(unwire(message.error));
        else waiting?.resolve(message.value);
        return;
      }
    }
  });
  worker.on('error', (error) => fail(`its worker failed: ${error.message}`));
  worker.on('exit', (code) => fail(`its worker exited (${code})`));

  const store: DenialStore & WorkerHouseKeeping = {
    get failed() {
      return state === 'failed';
    },
    add(records) {
      if (state === 'closing' || state === 'closed') throw closedError();
      for (const record of records) {
        if (state !== 'open' || queued() >= maxQueued) {
          counts.dropped += 1;
          counts.droppedEvents += record.count;
          continue;
        }
        buffer.push(record);
      }
      counts.queuedPeak = Math.max(counts.queuedPeak, queued());
      if (buffer.length >= postBatch) post();
      else if (!posting && buffer.length > 0) {
        posting = true;
        setImmediate(post);
      }
    },
    flush() {
      return call<undefined>({ kind: 'flush' });
    },
    idOf(record) {
      return ids.get(record);
    },
    async query(filter) {
      filterSql(filter);
      return call<StoredDenial[]>({ kind: 'query', filter });
    },
    async get(id) {
      if (!Number.isSafeInteger(id) || id < 1) throw new EgressError(ErrorCode.DenialFilter, `id: "${String(id)}" is not a record id`, { details: ['id'] });
      return call<StoredDenial | undefined>({ kind: 'get', id });
    },
    async summary(filter) {
      filterSql(filter);
      return call<DenialSummary>({ kind: 'summary', filter });
    },
    prune() {
      return call<{ age: number; size: number }>({ kind: 'prune' });
    },
    idle() {
      return call<undefined>({ kind: 'idle' });
    },
    counters(): DenialStoreCounters {
      return { queued: queued(), ...counts };
    },
    async close() {
      // The state changes in the worker's handlers, between awaits.
      const now = (): typeof state => state;
      if (now() === 'opening') await opened.catch(() => undefined);
      if (now() !== 'open') {
        if (now() !== 'failed') state = 'closed';
        await worker.terminate();
        return;
      }
      const done = call<undefined>({ kind: 'close' }).then(() => {
        // Answered: the worker's exit that follows is the end asked for, not a failure.
        state = 'closed';
      });
      state = 'closing';
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<'timeout'>((resolve) => {
        timer = setTimeout(() => resolve('timeout'), options.closeTimeoutMs ?? WORKER_DEFAULTS.closeTimeoutMs);
      });
      const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
      try {
        const outcome = await Promise.race([done.then(() => exited), timeout]);
        if (outcome === 'timeout') {
          report(new EgressError(ErrorCode.DenialStore, `denial store ${path}: its worker did not finish writing in time; stopped`));
          await worker.terminate();
        }
      } finally {
        clearTimeout(timer);
      }
    },
  };
  return opened.then(() => store);
}
