/**
 * The denial path as the daemon runs it: the reader (NFLOG → records, the
 * `denials` part) and the keeper (records → the SQLite store and the
 * journal, the `denial-store` part), joined by one feed that outlives
 * either's restarts. The D-Bus service gets the same feed and a store that
 * always answers for whichever store the keeper has open, so a restart of
 * either part never leaves the others holding a closed one.
 */
import type { Part, PartSpec } from '../daemon/part.js';
import { EgressError, ErrorCode, isEgressError } from '../errors.js';
import { openDenialJournal } from './journal.js';
import { keepDenials } from './keep.js';
import { denialsReaderPart, type DenialFeed } from './reader.js';
import { denialStorePath, openDenialStore, type DenialStore } from './store.js';

export interface DenialParts {
  /** Reads NFLOG; `--no-denials` turns the whole path off. */
  readonly reader: PartSpec;
  /** Keeps what the reader makes: the store and the journal. */
  readonly keeper: PartSpec;
  readonly feed: DenialFeed;
  /** The keeper's store while it has one open; otherwise every call fails with EGD_DENIAL_STORE. */
  readonly store: DenialStore;
}

export function denialParts(): DenialParts {
  const { spec, feed } = denialsReaderPart();
  let open: DenialStore | undefined;
  const current = (): DenialStore => {
    if (!open) throw new EgressError(ErrorCode.DenialStore, 'the denial store is not open (see the log: denial-store-failed)');
    return open;
  };
  const store: DenialStore = {
    add: (records) => current().add(records),
    flush: () => current().flush(),
    idOf: (record) => open?.idOf(record),
    query: (filter) => current().query(filter),
    get: (id) => current().get(id),
    summary: (filter) => current().summary(filter),
    close: () => undefined,
  };
  const keeper: PartSpec = {
    name: 'denial-store',
    start(_inForce, context): Promise<Part> {
      const journal = openDenialJournal({ log: context.log });
      let opened: DenialStore | undefined;
      try {
        opened = openDenialStore(denialStorePath(context.stateDir), { log: context.log });
      } catch (error) {
        // The journal still gets every record; the store is tried again at the next start of this part.
        context.log.error(
          { event: 'denial-store-failed', code: isEgressError(error) ? error.code : 'unknown', error: (error as Error).message },
          'the denial store could not be opened; denials go to the journal only',
        );
      }
      open = opened;
      const stop = keepDenials(feed, { store: opened, journal, log: context.log });
      return Promise.resolve({
        stopped: new Promise<never>(() => undefined),
        update: () => Promise.resolve(),
        describe: () =>
          `denials ${opened ? 'stored' : 'not stored (store failed)'} and sent to the ${journal.via === 'journal' ? 'journal' : 'log'}${journal.dropped > 0 ? ` (${journal.dropped} dropped from the journal while it was behind)` : ''}`,
        close() {
          stop();
          journal.close();
          if (open === opened) open = undefined;
          opened?.close();
          return Promise.resolve();
        },
      });
    },
  };
  return { reader: { ...spec, name: 'denials' }, keeper, feed, store };
}
