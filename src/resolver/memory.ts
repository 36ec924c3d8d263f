import { isIP } from 'node:net';
import { resolverNow } from './clock.js';
import { normalizeName } from './message.js';

/**
 * Which names an address was learned from, for as long as the answers
 * hold: `explain --to ADDRESS`, `status` and the denial log name the
 * address by them. Every name of the CNAME chain that led to an address is
 * kept with its own expiry — the shortest TTL on the chain from that name to
 * the address — not "the last lookup that returned it": a CDN address
 * answers many names at once, and each is true until its own answer expires.
 *
 * Bounded: at most `maxAddresses` addresses (the least recently learned go
 * first, counted as evictions) and `maxNamesPerAddress` names each (the
 * soonest to expire go first).
 *
 * Each name also keeps which uids were given it for this address (up to
 * MAX_ASKERS, then only that there were more): names come from every
 * local user's lookups, so a denial of one user's is named, and allowed,
 * by a name that user looked up itself — never by one another user chose
 * to point at the same address (namesFor).
 */

export interface LearnedName {
  readonly name: string;
  /** Milliseconds on the resolver's clock (clock.ts): since the epoch, unless the wall clock was set back while egressd ran. */
  readonly expiresAt: number;
}

/** A name of an address as one uid's denial may use it. */
export interface NameFor {
  readonly name: string;
  /** That uid itself was answered this name with the address; false: only other uids were (or more than are kept, and it is not among those). */
  readonly asked: boolean;
}

export interface MemoryCounters {
  /** Addresses held (some may have expired and not yet been swept). */
  readonly entries: number;
  /** Names held over all addresses. */
  readonly names: number;
  /** Addresses dropped because the cap was reached. */
  readonly evictions: number;
  /** Addresses dropped because every name of theirs expired. */
  readonly expired: number;
}

export interface MemoryOptions {
  readonly maxAddresses?: number;
  readonly maxNamesPerAddress?: number;
  /** The clock (ms), for tests. */
  readonly now?: () => number;
}

/** The shape of an answer's records (src/resolver/server.ts AnswerRecord), taken structurally. */
export interface AnswerLike {
  readonly name: string;
  readonly type: string;
  readonly ttl: number;
  readonly data: string;
}

interface NameEntry {
  readonly name: string;
  expiresAt: number;
  /** The next name of the chain towards the address (the CNAME target); undefined for the name the address record is for. */
  next: string | undefined;
  /** Who was answered it (Askers): a lone uid inline, most names have one asker and an array would cost each ~30 bytes more. */
  askers: Askers;
}

/** The uids given a name with an address: none known, one, or a few in the order they came, ending in MORE once past MAX_ASKERS. */
type Askers = number | number[] | undefined;
/** Uids kept per name and address: a few users share a machine; past these, who else asked is not kept (a uid can never be MORE). */
const MAX_ASKERS = 4;
const MORE = -1;

function withAsker(askers: Askers, uid: number): Askers {
  if (askers === undefined || askers === uid) return uid;
  if (typeof askers === 'number') return [askers, uid];
  if (askers.includes(uid) || askers[askers.length - 1] === MORE) return askers;
  // The first ones stay: a user who asked early cannot be pushed out by others asking after (and more uids only mean "others").
  askers.push(askers.length < MAX_ASKERS ? uid : MORE);
  return askers;
}

function askedBy(askers: Askers, uid: number): boolean {
  return typeof askers === 'number' ? askers === uid : askers !== undefined && askers.includes(uid);
}

/**
 * One address, linked into the recency list. An intrusive list, not Map
 * order: taking the oldest from a Map that is deleted from at its front scans
 * every hole the deletes left (measured here: ~30 µs per answer at 65,536
 * addresses); a list takes it in constant time. A few names each, so an array.
 */
interface AddressEntry {
  readonly address: string;
  /** Exactly as long as it holds: a push would give each address room for 16 more names (~150 bytes) it rarely uses. */
  names: NameEntry[];
  older: AddressEntry | undefined;
  newer: AddressEntry | undefined;
}

export class AddressMemory {
  private readonly byAddress = new Map<string, AddressEntry>();
  /** Least recently learned first. */
  private oldest: AddressEntry | undefined;
  private newest: AddressEntry | undefined;
  private readonly maxAddresses: number;
  private readonly maxNames: number;
  private readonly clock: () => number;
  private nameCount = 0;
  private evictions = 0;
  private expired = 0;

  constructor(options: MemoryOptions = {}) {
    // Measured: ~0.4 kB of heap per address with two names (a CNAME and its target), so ~13 MB when full — a fair share of the resolver's 80 MB.
    this.maxAddresses = options.maxAddresses ?? 32_768;
    this.maxNames = options.maxNamesPerAddress ?? 32;
    // The resolver's clock, as the filler's: a relearn after the wall clock was set puts back what is still alive, no more, no less.
    this.clock = options.now ?? resolverNow;
    if (this.maxAddresses < 1 || this.maxNames < 1) throw new Error('internal: memory caps must be at least 1');
  }

  /**
   * `names`: the chain that led to `address`, question first, the name of
   * the address record last. `ttlSeconds`: one for all, or each name's own.
   * A name already held keeps the later of its two expiries. `asker`: the
   * uid the answer was given to, noted on every name of the chain.
   */
  remember(names: readonly string[], address: string, ttlSeconds: number | readonly number[], now = this.clock(), asker?: number): void {
    if (names.length === 0) return;
    const key = canonicalAddress(address);
    let entry = this.byAddress.get(key);
    if (entry) this.unlink(entry);
    else {
      entry = { address: key, names: [], older: undefined, newer: undefined };
      this.byAddress.set(key, entry);
    }
    this.linkNewest(entry);
    let added: NameEntry[] | undefined;
    for (let i = 0; i < names.length; i++) {
      const name = normalizeName(names[i]!);
      const ttl = typeof ttlSeconds === 'number' ? ttlSeconds : (ttlSeconds[i] ?? 0);
      const expiresAt = now + Math.max(0, ttl) * 1000;
      const next = i + 1 < names.length ? normalizeName(names[i + 1]!) : undefined;
      const held = entry.names.find((n) => n.name === name) ?? added?.find((n) => n.name === name);
      if (held) {
        // Who was given a name that expired asked for what it pointed at then, not for what it is learned again as.
        if (held.expiresAt <= now) held.askers = undefined;
        held.expiresAt = Math.max(held.expiresAt, expiresAt);
        held.next = next;
        if (asker !== undefined) held.askers = withAsker(held.askers, asker);
      } else {
        (added ??= []).push({ name, expiresAt, next, askers: asker });
        this.nameCount++;
      }
    }
    if (added) entry.names = entry.names.length === 0 ? added.slice() : entry.names.concat(added);
    if (entry.names.length > this.maxNames) this.trimNames(entry, now);
    this.sweepOldest(now);
    while (this.byAddress.size > this.maxAddresses && this.oldest) {
      this.drop(this.oldest);
      this.evictions++;
    }
  }

  /**
   * Everything an answer teaches: for each address record, the chain of
   * CNAMEs from the question to it, each name expiring with the shortest TTL
   * between it and the address. `asker`: the uid the answer was given to.
   */
  rememberAnswer(question: string, records: readonly AnswerLike[], now = this.clock(), asker?: number): void {
    const cnameTo = new Map<string, AnswerLike>();
    for (const r of records) if (r.type === 'CNAME') cnameTo.set(normalizeName(r.data), r);
    const asked = normalizeName(question);
    for (const r of records) {
      if (r.type !== 'A' && r.type !== 'AAAA') continue;
      const chain = [normalizeName(r.name)];
      const ttls = [r.ttl];
      // Walk back from the address record's owner to the question; a loop or a stray record ends the walk.
      for (let hops = 0; chain[0] !== asked && hops < 32; hops++) {
        const link = cnameTo.get(chain[0]!);
        if (!link || chain.includes(normalizeName(link.name))) break;
        chain.unshift(normalizeName(link.name));
        ttls.unshift(Math.min(link.ttl, ttls[0]!));
      }
      this.remember(chain, r.data, ttls, now, asker);
    }
  }

  /** The names `address` was learned from that have not expired, latest expiry first. */
  namesOf(address: string, now = this.clock()): LearnedName[] {
    const entry = this.byAddress.get(canonicalAddress(address));
    if (!entry) return [];
    const live = entry.names.filter((held) => held.expiresAt > now).map(({ name, expiresAt }) => ({ name, expiresAt }));
    if (live.length === 0) {
      this.drop(entry);
      this.expired++;
    }
    return live.sort((a, b) => b.expiresAt - a.expiresAt || a.name.localeCompare(b.name));
  }

  /**
   * The names of `address` for a denial of `uid`'s, best first: those `uid`
   * itself was answered (latest expiry first), then those only others were.
   * A sender without a uid (an orphaned socket) asked for none.
   */
  namesFor(address: string, uid: number | undefined, now = this.clock()): NameFor[] {
    const entry = this.byAddress.get(canonicalAddress(address));
    if (!entry) return [];
    const live = entry.names.filter((held) => held.expiresAt > now);
    const asked = (held: NameEntry) => uid !== undefined && askedBy(held.askers, uid);
    return live
      .sort((a, b) => Number(asked(b)) - Number(asked(a)) || b.expiresAt - a.expiresAt || a.name.localeCompare(b.name))
      .map((held) => ({ name: held.name, asked: asked(held) }));
  }

  /**
   * The chains (question first) that still lead to `address`. More than one
   * means the address is shared: it answers names that have nothing to do
   * with each other (a CDN), and a verdict for one is a verdict for all.
   */
  sharedWith(address: string, now = this.clock()): string[][] {
    const entry = this.byAddress.get(canonicalAddress(address));
    if (!entry) return [];
    const live = new Map(entry.names.filter((held) => held.expiresAt > now).map((held) => [held.name, held]));
    const pointedAt = new Set([...live.values()].map((held) => held.next).filter((n) => n !== undefined));
    const chains: string[][] = [];
    for (const head of [...live.keys()].filter((name) => !pointedAt.has(name)).sort()) {
      const chain = [head];
      for (let next = live.get(head)?.next; next !== undefined && live.has(next) && !chain.includes(next); next = live.get(next)?.next) chain.push(next);
      chains.push(chain);
    }
    return chains;
  }

  /** Up to `limit` addresses, most recently learned first, that more than one chain leads to, with those chains. */
  shared(limit: number, now = this.clock()): { address: string; chains: string[][] }[] {
    const found: { address: string; chains: string[][] }[] = [];
    for (let entry = this.newest; entry && found.length < limit; entry = entry.older) {
      if (entry.names.length < 2) continue;
      const chains = this.sharedWith(entry.address, now);
      if (chains.length > 1) found.push({ address: entry.address, chains });
    }
    return found;
  }

  /** Every unexpired chain and the seconds its first name has left: what a re-apply puts into sets it made anew. */
  *chains(now = this.clock()): Generator<{ address: string; chain: string[]; ttl: number }> {
    for (const entry of [...this.byAddress.values()]) {
      for (const chain of this.sharedWith(entry.address, now)) {
        const expiresAt = Math.min(...chain.map((name) => entry.names.find((held) => held.name === name)?.expiresAt ?? now));
        const ttl = Math.floor((expiresAt - now) / 1000);
        if (ttl > 0) yield { address: entry.address, chain, ttl };
      }
    }
  }

  counters(): MemoryCounters {
    return { entries: this.byAddress.size, names: this.nameCount, evictions: this.evictions, expired: this.expired };
  }

  /** Drops every address none of whose names still holds. */
  prune(now = this.clock()): void {
    for (const entry of [...this.byAddress.values()]) {
      if (allExpired(entry, now)) {
        this.drop(entry);
        this.expired++;
      }
    }
  }

  /** Expired names first, then the soonest to expire, down to the cap. */
  private trimNames(entry: AddressEntry, now: number): void {
    const before = entry.names.length;
    const kept = entry.names.filter((held) => held.expiresAt > now);
    if (kept.length > this.maxNames) kept.sort((a, b) => b.expiresAt - a.expiresAt).length = this.maxNames;
    entry.names = kept.slice();
    this.nameCount -= before - kept.length;
  }

  /** The least recently learned address, dropped when all of it expired: sweeping as it learns keeps the work per answer constant. */
  private sweepOldest(now: number): void {
    if (this.oldest && allExpired(this.oldest, now)) {
      this.drop(this.oldest);
      this.expired++;
    }
  }

  private drop(entry: AddressEntry): void {
    this.unlink(entry);
    this.byAddress.delete(entry.address);
    this.nameCount -= entry.names.length;
  }

  private unlink(entry: AddressEntry): void {
    if (entry.older) entry.older.newer = entry.newer;
    else this.oldest = entry.newer;
    if (entry.newer) entry.newer.older = entry.older;
    else this.newest = entry.older;
    entry.older = entry.newer = undefined;
  }

  private linkNewest(entry: AddressEntry): void {
    entry.older = this.newest;
    if (this.newest) this.newest.newer = entry;
    else this.oldest = entry;
    this.newest = entry;
  }
}

function allExpired(entry: AddressEntry, now: number): boolean {
  return entry.names.every((held) => held.expiresAt <= now);
}

/**
 * One spelling per address: IPv6 compressed and lower-case (as WHATWG URLs
 * print it), an IPv4-mapped one as the IPv4 address the kernel sends to. A
 * scope id is kept; text that is no address comes back as it was.
 */
export function canonicalAddress(address: string): string {
  const percent = address.indexOf('%');
  const bare = percent >= 0 ? address.slice(0, percent) : address;
  const scope = percent >= 0 ? address.slice(percent) : '';
  if (isIP(bare) !== 6) return address;
  const printed = new URL(`http://[${bare}]/`).hostname.slice(1, -1);
  const mapped = /^::ffff:([0-9a-f]{1,4}):([0-9a-f]{1,4})$/.exec(printed);
  if (mapped && scope === '') {
    const hi = parseInt(mapped[1]!, 16);
    const lo = parseInt(mapped[2]!, 16);
    return `${hi >> 8}.${hi & 255}.${lo >> 8}.${lo & 255}`;
  }
  return `${printed}${scope}`;
}
