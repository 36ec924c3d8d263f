/**
 * Whose denial records are whose, for the store's size cap: when the store
 * is over it, records go first from the user holding the most, so one user
 * flooding new destinations evicts its own history, not everyone's. A
 * user's subordinate uids (/etc/subuid: what its user namespaces send as)
 * are that user's: a flood spread over thousands of them still counts as
 * one holder's.
 */
import type { Accounts } from '../system/nss.js';
import { ownerIn, readSubordinateLines } from '../system/subordinate.js';

/** The uid the store keeps records of orphaned sockets under (no uid is -1: (uid_t)-1 is "no id"). */
export const NO_UID = -1;

/** A holder's records, by uid, the uid holding most first. */
export interface Holding {
  readonly holder: string;
  readonly records: number;
  readonly uids: readonly { readonly uid: number; readonly records: number }[];
}

/**
 * Each uid's holder: "uid:N" for a uid, and for a subordinate uid its
 * range's owner's ("uid:OWNER-UID"; "subuid:OWNER" when the owner's name
 * cannot be looked up). A file that cannot be read gives no ranges: each
 * uid holds its own.
 */
export function holderLookup(subuidFile: string, accounts: Pick<Accounts, 'user'>): (uid: number) => string {
  const lines = readSubordinateLines(subuidFile);
  const owners = new Map<string, string>();
  const ownerOf = (owner: string): string => {
    let key = owners.get(owner);
    if (key === undefined) {
      // newuidmap takes the owner as a name or as a uid printed as %lu.
      const found = /^(0|[1-9]\d*)$/.test(owner) ? { uid: Number(owner) } : accounts.user(owner);
      key = found !== undefined && !('error' in found) ? `uid:${found.uid}` : `subuid:${owner}`;
      owners.set(owner, key);
    }
    return key;
  };
  return (uid) => {
    if (uid === NO_UID) return 'orphaned';
    const owner = ownerIn(lines, uid);
    return owner === undefined ? `uid:${uid}` : ownerOf(owner);
  };
}

/** The holder of the most records, with its uids; undefined when none holds any. */
export function largestHolding(counts: readonly { readonly uid: number; readonly records: number }[], holderOf: (uid: number) => string): Holding | undefined {
  const byHolder = new Map<string, { records: number; uids: { uid: number; records: number }[] }>();
  for (const { uid, records } of counts) {
    if (records <= 0) continue;
    const holder = holderOf(uid);
    let held = byHolder.get(holder);
    if (held === undefined) byHolder.set(holder, (held = { records: 0, uids: [] }));
    held.records += records;
    held.uids.push({ uid, records });
  }
  let largest: Holding | undefined;
  for (const [holder, held] of byHolder) {
    // Ties go the same way every time (the holder's key), so a prune is repeatable.
    if (largest === undefined || held.records > largest.records || (held.records === largest.records && holder < largest.holder))
      largest = { holder, records: held.records, uids: held.uids.sort((a, b) => b.records - a.records || a.uid - b.uid) };
  }
  return largest;
}
