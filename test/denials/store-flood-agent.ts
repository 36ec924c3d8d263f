/**
 * The denial reader with the store attached as egressd runs it (the store's
 * database in its worker thread), in a test's host namespace: binds the log
 * group, hands every record to the store, and prints JSON lines — the
 * counters for each "counters" line on stdin; for "finish", it closes the
 * reader (its open aggregates become records), waits for the store to write
 * what it took, and prints what the store holds beside what it was fed.
 * argv: group, store directory, maxQueued, batchSize, flushIntervalMs.
 */
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import pino from 'pino';
import type { InForce } from '../../src/resolver/runtime.js';
import { startDenialReader } from '../../src/denials/reader.js';
import { startDenialStore } from '../../src/denials/store-worker.js';

const [group, dir, maxQueued, batchSize, flushIntervalMs] = process.argv.slice(2);
const stateDir = process.env['EGRESSD_STATE_DIR'] ?? '/nonexistent';
const inForce = { policy: { defaults: { log: { group: Number(group) } }, apps: [], globalDeny: [] }, compiled: { ruleIds: [] } } as unknown as InForce;
const log = pino({ level: 'warn' }, pino.destination(2));
const reader = await startDenialReader(inForce, { log, stateDir, learnedNames: () => [] }, { windowMs: 500, maxOpen: 100 });
const store = await startDenialStore(join(dir!, 'denials.sqlite'), {
  log,
  group: null,
  maxQueued: Number(maxQueued),
  batchSize: Number(batchSize),
  flushIntervalMs: Number(flushIntervalMs),
});
const fed = { records: 0, packets: 0 };
reader.subscribe((record) => {
  fed.records += 1;
  fed.packets += record.count;
  store.add([record]);
});
process.stdout.write(`${JSON.stringify({ ready: true })}\n`);
for await (const line of createInterface({ input: process.stdin })) {
  if (line === 'counters') process.stdout.write(`${JSON.stringify({ counters: reader.counters(), store: store.counters() })}\n`);
  if (line === 'finish') {
    await reader.close();
    await store.flush();
    const summary = await store.summary({});
    process.stdout.write(
      `${JSON.stringify({ finished: { counters: reader.counters(), store: store.counters(), fed, stored: { records: summary.records, packets: summary.packets } } })}\n`,
    );
    await store.close();
    break;
  }
}
