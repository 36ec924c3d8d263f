import { createHash } from 'node:crypto';

/**
 * Who a tracked connection belongs to, written into its conntrack mark.
 *
 * `ct state established` does not ask who sends: a process that binds the
 * source port of another identity's live UDP flow (after that socket closed,
 * or with SO_REUSEADDR) sends on that flow's conntrack entry. So, in a table
 * that uses conntrack (one with a default deny), every rule that lets a
 * packet out for an app or for the global default writes that identity's tag
 * into the entry's mark, and a default deny lets established packets through
 * only when the tag is its own identity's.
 *
 * egressd owns the high 16 bits of the ct mark, and only those: it writes
 * them with `ct mark set ct mark & 0x0000ffff | TAG` and compares them under
 * the mask, so the low 16 bits stay whatever other software put there.
 * Policy routing set up by hand and by VPN tools (wg-quick's 51820 = 0xca6c,
 * OpenWrt mwan3's 0x3f00, the small numbers of most how-tos) keeps its marks
 * in the low bits. Software that writes the whole ct mark of a connection
 * (`ct mark set meta mark` without a mask) clears egressd's tag: that
 * connection then passes a default deny only where a rule allows it.
 *
 * Tag 0 is nobody's: connections opened before a marking table, or let out
 * by a path that names no identity (loopback, Tor's own user), and
 * connections that came in until one of our identities answers. Tag 1 is the
 * global default's. An app's tag is derived from its name alone, so it is
 * the same at every apply that keeps the app — a connection it opened stays
 * its own across re-applies — whatever the order of files or of apps in them.
 */
export const CT_MARK_MASK = '0xffff0000';
/** The bits a mark write keeps: everything but egressd's. */
export const CT_MARK_KEEP = '0x0000ffff';

export const UNCLAIMED_TAG = 0;
export const DEFAULT_TAG = 1;
const FIRST_APP_TAG = 2;
const TAGS = 0x10000;

/** A tag as the mark's bits, as nft writes it: `0x00010000`. */
export function markValue(tag: number): string {
  return `0x${markBits(tag).toString(16).padStart(8, '0')}`;
}

/** A tag as the mark's bits, a number: a map's key. */
export function markBits(tag: number): number {
  return tag * TAGS;
}

/**
 * A tag per app name: a digest of the name picks a preferred tag; names are
 * placed in code-unit order, and one whose tag is taken gets the next free
 * one. The result depends only on the set of names. A new app can move an
 * existing one only when its preferred tag is the one that app holds (1 in
 * 65,534 for each app already there) and its name sorts first; that app's
 * open connections then meet its default as new ones once. A tag an app
 * leaves behind can go to a later app by the same chance. At most 65,534
 * apps have tags (a policy with more is refused as an internal error).
 */
export function appTags(names: readonly string[]): Map<string, number> {
  const span = TAGS - FIRST_APP_TAG;
  if (names.length > span) throw new Error(`internal: ${names.length} apps, but only ${span} conntrack tags`);
  const taken = new Set<number>();
  const tags = new Map<string, number>();
  for (const name of [...names].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0))) {
    let slot = createHash('sha256').update(name).digest().readUInt32BE(0) % span;
    while (taken.has(slot)) slot = (slot + 1) % span;
    taken.add(slot);
    tags.set(name, FIRST_APP_TAG + slot);
  }
  return tags;
}
