/**
 * The denial store's worker thread: runs the SQLite database (store.ts,
 * synchronous) away from the daemon's thread, which the resolver and the
 * NFLOG reader share. Started by store-worker.ts; messages in order:
 * records to add, then calls (flush, query, get, summary, close), each
 * answered once. Every committed or refused batch is told back (ids in
 * order), so the daemon's thread knows each record's row id and what is
 * still queued.
 */
import { setPriority } from 'node:os';
import { parentPort, workerData } from 'node:worker_threads';
import type { Logger } from 'pino';
import { EgressError } from '../errors.js';
import type { DenialRecord } from './record.js';
import { openDenialStore, type DenialDatabase, type DenialStoreOptions } from './store.js';
import type { FromThread, StoreCall, ThreadData, ToThread, WireError } from './store-worker.js';

const port = parentPort;
if (!port) throw new Error('store-thread.ts runs as a worker thread (store-worker.ts starts it)');
const post = (message: FromThread, transfer?: ArrayBuffer[]): void => port.postMessage(message, transfer);

function wire(error: unknown): WireError {
  if (error instanceof EgressError) return { code: error.code, message: error.message, details: [...error.details] };
  return { message: error instanceof Error ? error.message : String(error), details: [] };
}

// Under a flood of new destinations there is more to write than one core writes (~25k records/s): the store is what should give, not
// the reader counting the flood or the resolver beside it. Linux's nice is per thread; the shipped unit's seccomp refuses it (@resources).
try {
  setPriority(10);
} catch {
  // EPERM under the unit: the bounded queue still sheds what the store cannot keep up with.
}

// The daemon's logger cannot cross threads: its calls are posted and logged there.
const level =
  (name: 'info' | 'warn' | 'error') =>
  (obj: object, msg?: string): void =>
    post({ t: 'log', level: name, obj: JSON.parse(JSON.stringify(obj)) as object, ...(msg !== undefined && { msg }) });
const log = { info: level('info'), warn: level('warn'), error: level('error') } as unknown as Logger;

const data = workerData as ThreadData;
let db: (DenialDatabase & { idle(): Promise<void>; prune(): Promise<unknown> }) | undefined;
try {
  const options: DenialStoreOptions = {
    ...data.options,
    log,
    onError: (error) => post({ t: 'error', error: wire(error) }),
    onBatch: (records: readonly DenialRecord[], ids) => {
      if (ids === undefined) post({ t: 'failed', n: records.length });
      else {
        const array = Float64Array.from(ids);
        post({ t: 'written', ids: array }, [array.buffer]);
      }
    },
  };
  db = openDenialStore(data.path, options);
  post({ t: 'opened' });
} catch (error) {
  post({ t: 'open-failed', error: wire(error) });
}

async function answer(call: StoreCall): Promise<unknown> {
  const open = db!;
  switch (call.kind) {
    case 'flush':
      open.flush();
      return undefined;
    case 'query':
      return open.query(call.filter);
    case 'get':
      return open.get(call.id);
    case 'summary':
      return open.summary(call.filter);
    case 'prune':
      return open.prune();
    case 'idle':
      return open.idle();
    case 'close':
      open.close();
      return undefined;
  }
}

port.on('message', (message: ToThread) => {
  if (!db) return;
  if (message.t === 'add') {
    try {
      db.add(message.records);
    } catch (error) {
      // A batch the database refused: already told (onBatch), reported here.
      post({ t: 'error', error: wire(error) });
    }
    return;
  }
  const { seq, call } = message;
  answer(call).then(
    (value) => {
      post({ t: 'done', seq, value });
      if (call.kind === 'close') port.close();
    },
    (error: unknown) => post({ t: 'done', seq, error: wire(error) }),
  );
});
