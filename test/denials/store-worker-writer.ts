/**
 * The daemon's store (its worker thread) under a steady stream, for the
 * SIGKILL test: adds numbered records (gid = sequence number), 100 at a
 * time, never past the queue's bound (so none is dropped and what is stored
 * must be an unbroken prefix), and says on stdout after each 100 how many
 * it has handed to `add` (stdout to a pipe is synchronous on Linux).
 */
import { startDenialStore } from '../../src/denials/store-worker.js';
import { denial } from './store-records.js';

const [path, flushMs, batch, maxQueued] = process.argv.slice(2);
const store = await startDenialStore(path!, { flushIntervalMs: Number(flushMs), batchSize: Number(batch), maxQueued: Number(maxQueued), group: null });
let seq = 0;
const burst = (): void => {
  if (store.counters().queued + 100 > Number(maxQueued)) {
    setTimeout(burst, 1);
    return;
  }
  const records = [];
  for (let i = 0; i < 100; i++) records.push(denial({ gid: seq + i, lastSeen: Date.now() }));
  store.add(records);
  if (store.counters().dropped > 0) throw new Error('dropped: the writer outran the bound');
  seq += 100;
  process.stdout.write(`added ${seq}\n`);
  setImmediate(burst);
};
burst();
