/**
 * Whose share of the resolver a query or a connection takes (the caps per
 * user of limits.ts): the uid's own, or for a subordinate uid (/etc/subuid:
 * what a rootless container sends as when it shares the machine's network
 * namespace) its range's owner's. Keyed on the raw uid, a user with 8
 * subordinate uids would hold 8 shares, enough to take every slot.
 */
import { nssLookup, type NameLookup } from '../system/nss.js';
import { subordinateOwners } from '../system/subordinate.js';

export interface OwnerKeysOptions {
  /** Default /etc/subuid. */
  readonly subuidFile?: string;
  /** The file is read again, and its owners' names looked up again, once what was read is this old (ms). Default 5 s, as the D-Bus service. */
  readonly maxAgeMs?: number;
  /** User names to uids; default NSS, made on first need. */
  readonly lookup?: NameLookup;
  readonly now?: () => number;
}

/** Owner names looked up at most; past it they are looked up anew (the file's owners are few, written by root). */
const OWNER_NAMES = 1024;

/**
 * The key of the share `uid` takes: its owner's uid in decimal. An owner
 * named by a user name NSS does not know (or cannot say) is still one share,
 * its name's. Root's is root's whatever a range says: a line that gives a
 * user uid 0 must not put root's queries into that user's share.
 */
export function ownerKeys(options: OwnerKeysOptions = {}): (uid: number) => string {
  const now = options.now ?? Date.now;
  const maxAgeMs = options.maxAgeMs ?? 5000;
  const ownerOf = subordinateOwners({ maxAgeMs, now, ...(options.subuidFile === undefined ? {} : { file: options.subuidFile }) });
  let lookup = options.lookup;
  const byName = new Map<string, { key: string; at: number }>();
  const keyOfOwner = (owner: string): string => {
    // As newuidmap reads an owner: a uid as "%lu" prints it, else a name.
    if (/^(0|[1-9][0-9]*)$/.test(owner)) return owner;
    const t = now();
    const known = byName.get(owner);
    if (known !== undefined && t - known.at >= 0 && t - known.at < maxAgeMs) return known.key;
    const uid = (lookup ??= nssLookup())('user', owner);
    const key = typeof uid === 'number' ? String(uid) : `subuid:${owner}`;
    if (byName.size >= OWNER_NAMES) byName.clear();
    byName.set(owner, { key, at: t });
    return key;
  };
  return (uid) => {
    if (uid === 0) return '0';
    const owner = ownerOf(uid);
    return owner === undefined ? String(uid) : keyOfOwner(owner);
  };
}
