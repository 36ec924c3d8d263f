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
import { denialStorePath, type DenialStore, type DenialStoreCounters } from './store.js';
import { startDenialStore, type WorkerHouseKeeping } from './store-worker.js';

export interface DenialParts {
  /** Reads NFLOG; `--no-denials` turns the whole path off. */
  readonly reader: PartSpec;
  /** Keeps what the reader makes: the store (in its worker thread) and the journal. */
  readonly keeper: PartSpec;
  readonly feed: DenialFeed;
  /** The keeper's store while it has one open; otherwise every call fails with EGD_DENIAL_STORE. Its counters run across the stores the keeper opened. */
  readonly store: DenialStore;
}

/** How often a store that would not open (or whose worker stopped) is tried again. */
const STORE_RETRY_MS = 60_000;

const NO_COUNTS: DenialStoreCounters = { queued: 0, queuedPeak: 0, written: 0, dropped: 0, droppedEvents: 0, failed: 0, failedEvents: 0 };

export function denialParts(): DenialParts {
  const { spec, feed } = denialsReaderPart();
  let open: (DenialStore & WorkerHouseKeeping) | undefined;
  /** What stores closed before the one open now counted: status shows every record dropped since egressd started. */
  let retired: DenialStoreCounters = NO_COUNTS;
  /** The counts of the stores closed before (`retired`) and of `c`; what is queued is `c`'s alone. */
  const since = (c: DenialStoreCounters): DenialStoreCounters => ({
    queued: c.queued,
    queuedPeak: Math.max(retired.queuedPeak, c.queuedPeak),
    written: retired.written + c.written,
    dropped: retired.dropped + c.dropped,
    droppedEvents: retired.droppedEvents + c.droppedEvents,
    failed: retired.failed + c.failed,
    failedEvents: retired.failedEvents + c.failedEvents,
  });
  const retire = (closing: DenialStore): void => {
    retired = { ...since(closing.counters()), queued: 0 };
  };
  const current = (): DenialStore => {
    if (!open) throw new EgressError(ErrorCode.DenialStore, 'the denial store is not open (see the log: denial-store-failed)');
    return open;
  };
  const store: DenialStore = {
    add: (records) => current().add(records),
    // Nothing to flush without a store: a caller that only wants what was added written (the Denied signals) goes on.
    flush: () => open?.flush() ?? Promise.resolve(),
    idOf: (record) => open?.idOf(record),
    query: async (filter) => current().query(filter),
    get: async (id) => current().get(id),
    summary: async (filter) => current().summary(filter),
    counters: () => since(open?.counters() ?? NO_COUNTS),
    close: () => Promise.resolve(),
  };
  const keeper: PartSpec = {
    name: 'denial-store',
    async start(_inForce, context): Promise<Part> {
      // EGRESSD_JOURNAL_SOCKET: another socket (a lab's egressd, `egressctl try`, sends nothing to the host's journal).
      const socket = process.env['EGRESSD_JOURNAL_SOCKET'];
      const journal = openDenialJournal({ log: context.log, ...(socket !== undefined && { socket }) });
      let opened: (DenialStore & WorkerHouseKeeping) | undefined;
      let opening = false;
      let closed = false;
      const isClosed = (): boolean => closed;
      let said = false;
      const tryOpen = async (): Promise<void> => {
        if (opening || closed) return;
        opening = true;
        try {
          const fresh = await startDenialStore(denialStorePath(context.stateDir), { log: context.log });
          // The part may have been closed while the worker opened the database.
          if (isClosed()) {
            await fresh.close();
            return;
          }
          opened = fresh;
          open = fresh;
          if (said) context.log.info({ event: 'denial-store-opened' }, 'the denial store opened; denials are stored again');
          said = false;
        } catch (error) {
          // The journal still gets every record; the store is tried again every STORE_RETRY_MS.
          if (!said)
            context.log.error(
              { event: 'denial-store-failed', code: isEgressError(error) ? error.code : 'unknown', error: (error as Error).message },
              'the denial store could not be opened; denials go to the journal only until it opens',
            );
          said = true;
        } finally {
          opening = false;
        }
      };
      // The part starts once the store has opened or failed to: its first records are stored.
      await tryOpen();
      const retry = setInterval(() => {
        // A worker that stopped (it said so: denial-store-failed) is replaced like a store that never opened.
        if (opened?.failed) {
          retire(opened);
          if (open === opened) open = undefined;
          opened = undefined;
          said = true;
        }
        if (!opened) void tryOpen();
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
      return {
        stopped: new Promise<never>(() => undefined),
        update: () => Promise.resolve(),
        describe: () => {
          const c = store.counters();
          const lost = c.dropped + c.failed;
          return `denials ${opened && !opened.failed ? 'stored' : 'not stored (store failed)'}${lost > 0 ? ` (${lost} records not stored: the store was behind or failing)` : ''} and sent to the ${journal.via === 'journal' ? 'journal' : 'log'}${journal.dropped > 0 ? ` (${journal.dropped} dropped from the journal while it was behind)` : ''}`;
        },
        async close() {
          closed = true;
          clearInterval(retry);
          stop();
          journal.close();
          if (open === opened) open = undefined;
          const closing = opened;
          opened = undefined;
          if (closing) {
            await closing
              .close()
              .catch((error: unknown) =>
                context.log.error(
                  { event: 'denial-store-failed', code: isEgressError(error) ? error.code : 'unknown', error: (error as Error).message },
                  'the denial store did not close cleanly',
                ),
              );
            retire(closing);
          }
        },
      };
    },
  };
  return { reader: { ...spec, name: 'denials' }, keeper, feed, store };
}
