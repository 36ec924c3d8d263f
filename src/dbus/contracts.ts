/**
 * The denial store's and the denial feed's interfaces as BRIEF-RT.md fixes
 * them, written here because src/denials/store.ts and src/denials/reader.ts
 * are built at the same time on other branches. The service takes any value
 * of these shapes (TypeScript compares structurally), so the real store and
 * reader plug in unchanged; at merge these become re-exports of theirs.
 */
import type { DenialRecord } from '../denials/record.js';

export type { DenialFilter, StoredDenial, Ranked, DenialSummary, DenialStore } from '../denials/store.js';

export interface DenialCounters {
  readonly events: number;
  readonly records: number;
  readonly lost: number;
  readonly enobufs: number;
  readonly sequenceGaps: number;
  readonly unparsed: number;
}

export interface DenialFeed {
  subscribe(listener: (record: DenialRecord) => void): () => void;
  counters(): DenialCounters;
}
