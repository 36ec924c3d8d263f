/**
 * Where each record the reader makes goes: the store (for `egressctl
 * denials`, D-Bus queries and allow-from-alert) and the journal (for
 * fleets). Neither can stop the other, nor the reader: a store that fails is
 * logged once per kind of failure and the journal still gets every record.
 *
 * The daemon's denial part (the lead wires it) does, with the reader's feed:
 *   const store = openDenialStore(denialStorePath(context.stateDir), { log: context.log });   // may throw EGD_DENIAL_STORE: log it, keep the journal
 *   const journal = openDenialJournal({ log: context.log });
 *   const stop = keepDenials(feed, { store, journal, log: context.log });
 *   // on close: stop(); store.close();
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
  sinks: { readonly store: DenialStore | undefined; readonly journal: DenialJournal; readonly log: Logger },
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
