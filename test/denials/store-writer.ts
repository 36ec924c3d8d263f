/**
 * A daemon's store under a flood, for the SIGKILL test: adds numbered
 * records (gid = sequence number) as fast as it can and says on stdout,
 * after each 100, how many it has handed to `add` (stdout to a pipe is
 * synchronous on Linux: a line printed was added).
 */
import { openDenialStore } from '../../src/denials/store.js';
import { denial } from './store-records.js';

const [path, flushMs, batch] = process.argv.slice(2);
const store = openDenialStore(path!, { flushIntervalMs: Number(flushMs), batchSize: Number(batch), group: null });
let seq = 0;
const burst = (): void => {
  const records = [];
  for (let i = 0; i < 100; i++) records.push(denial({ gid: seq + i, lastSeen: Date.now() }));
  store.add(records);
  seq += 100;
  process.stdout.write(`added ${seq}\n`);
  setImmediate(burst);
};
burst();
