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

/** How often a store that would not open is tried again. */
const STORE_RETRY_MS = 60_000;

export function denialParts(): DenialParts {
  const { spec, feed } = denialsReaderPart();
  let open: DenialStore | undefined;
  const current = (): DenialStore => {
    if (!open) throw new EgressError(ErrorCode.DenialStore, 'the denial store is not open (see the log: denial-store-failed)');
    return open;
  };
  const store: DenialStore = {
    add: (records) => current().add(records),
    // Nothing to flush without a store: a caller that only wants what was added written (the Denied signals) goes on.
    flush: () => open?.flush(),
    idOf: (record) => open?.idOf(record),
    query: (filter) => current().query(filter),
    get: (id) => current().get(id),
    summary: (filter) => current().summary(filter),
    close: () => undefined,
  };
  const keeper: PartSpec = {
    name: 'denial-store',
    start(_inForce, context): Promise<Part> {
      // EGRESSD_JOURNAL_SOCKET: another socket (a lab's egressd, `egressctl try`, sends nothing to the host's journal).
      const socket = process.env['EGRESSD_JOURNAL_SOCKET'];
      const journal = openDenialJournal({ log: context.log, ...(socket !== undefined && { socket }) });
      let opened: DenialStore | undefined;
      let said = false;
      const tryOpen = (): void => {
        try {
          opened = openDenialStore(denialStorePath(context.stateDir), { log: context.log });
          open = opened;
          if (said) context.log.info({ event: 'denial-store-opened' }, 'the denial store opened; denials are stored again');
        } catch (error) {
          // The journal still gets every record; the store is tried again every STORE_RETRY_MS.
          if (!said)
            context.log.error(
              { event: 'denial-store-failed', code: isEgressError(error) ? error.code : 'unknown', error: (error as Error).message },
              'the denial store could not be opened; denials go to the journal only until it opens',
            );
          said = true;
        }
      };
      tryOpen();
      const retry = setInterval(() => {
        if (opened) clearInterval(retry);
        else tryOpen();
      }, STORE_RETRY_MS);
      retry.unref();
      const sinks = {
        journal,
        log: context.log,
        get store() {
          return opened;
        },
      };
      const stop = keepDenials(feed, sinks);
      return Promise.resolve({
        stopped: new Promise<never>(() => undefined),
        update: () => Promise.resolve(),
        describe: () =>
          `denials ${opened ? 'stored' : 'not stored (store failed)'} and sent to the ${journal.via === 'journal' ? 'journal' : 'log'}${journal.dropped > 0 ? ` (${journal.dropped} dropped from the journal while it was behind)` : ''}`,
        close() {
          clearInterval(retry);
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
