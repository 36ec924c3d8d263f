/**
 * Where each record the reader makes goes: the store (for `egressctl
 * denials`, D-Bus queries and allow-from-alert) and the journal (for
 * fleets). Neither can stop the other, nor the reader: a store that fails is
 * logged once per kind of failure and the journal still gets every record.
 *
 * The daemon's denial part (part.ts) does, with the reader's feed:
 *   const store = await startDenialStore(denialStorePath(context.stateDir), { log: context.log });   // may reject EGD_DENIAL_STORE: log it, keep the journal
 *   const journal = openDenialJournal({ log: context.log });
 *   const stop = keepDenials(feed, { store, journal, log: context.log });
 *   // on close: stop(); await store.close();
 * The store's add never waits: it hands the record to the store's worker
 * thread, or counts it dropped when the worker is too far behind.
 */
import type { Logger } from 'pino';
import { isEgressError } from '../errors.js';
import type { DenialJournal } from './journal.js';
import type { DenialRecord } from './record.js';
import type { DenialStore } from './store.js';

/** The part of the reader's DenialFeed (src/denials/reader.ts) this needs. */
export interface RecordSource {
  subscribe(listener: (record: DenialRecord) => void): () => void;
}

export function keepDenials(
  source: RecordSource,
  sinks: { readonly store: Pick<DenialStore, 'add'> | undefined; readonly journal: DenialJournal; readonly log: Logger },
): () => void {
  const said = new Set<string>();
  return source.subscribe((record) => {
    sinks.journal.write(record);
    if (!sinks.store) return;
    try {
      sinks.store.add([record]);
    } catch (error) {
      const code = isEgressError(error) ? error.code : 'unknown';
      if (said.has(code)) return;
      said.add(code);
      sinks.log.error({ event: 'denial-store-failed', code, error: (error as Error).message }, 'the denial store failed; enforcement goes on');
    }
  });
}
