/**
 * What the D-Bus service takes of the denial path: the store's and the
 * reader's interfaces, from their own modules (the service was built against
 * BRIEF-RT.md's copy of them before those modules were merged).
 */
export type { DenialFilter, StoredDenial, Ranked, DenialSummary, DenialStore, DenialStoreCounters } from '../denials/store.js';
export type { DenialCounters, DenialFeed } from '../denials/reader.js';
