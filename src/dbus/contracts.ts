/**
 * The denial store's and the denial feed's interfaces as BRIEF-RT.md fixes
 * them, written here because src/denials/store.ts and src/denials/reader.ts
 * are built at the same time on other branches. The service takes any value
 * of these shapes (TypeScript compares structurally), so the real store and
 * reader plug in unchanged; at merge these become re-exports of theirs.
 */
import type { DenialRecord } from '../denials/record.js';

export interface DenialFilter {
  /** ms since the epoch, compared with lastSeen. */
  readonly since?: number;
  readonly until?: number;
  /** An app or system domain name. */
  readonly app?: string;
  /** A name (exact, or *.suffix), an address or a CIDR. */
  readonly dest?: string;
  /** A short id ("r1a2b3c4d") or the policy's rule id. */
  readonly rule?: string;
  /** Only this uid's records. */
  readonly uid?: number;
  /** Newest first; default 1000. */
  readonly limit?: number;
}

/** A stored record with its row id: what AllowFromDenial(recordId) names. */
export interface StoredDenial extends DenialRecord {
  readonly id: number;
}

export interface Ranked {
  readonly key: string;
  readonly count: number;
}

export interface DenialSummary {
  readonly records: number;
  readonly packets: number;
  readonly apps: readonly Ranked[];
  readonly destinations: readonly Ranked[];
  readonly rules: readonly Ranked[];
}

export interface DenialStore {
  add(records: readonly DenialRecord[]): void;
  flush(): void;
  query(filter: DenialFilter): StoredDenial[];
  get(id: number): StoredDenial | undefined;
  summary(filter: DenialFilter): DenialSummary;
  close(): void;
}

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
