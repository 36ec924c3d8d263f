/**
 * The resolver's answer cache: keyed by (name, type, class), TTL-aware,
 * bounded by entry count and bytes; what goes first is what was used
 * least recently, as a clock (second chance) finds it: a hit only marks its
 * entry, and eviction passes over a marked entry once (unmarking it), so a
 * hit costs no reordering of the map — moving every hit to the map's end
 * cost the warm path ~1.2 µs a query (a delete and an insert, and the map's
 * rebuilds behind them).
 *
 * An entry lives as long as the smallest TTL of its records (a positive
 * answer, capped at maxTtl) or, for a negative answer (NXDOMAIN or no data),
 * the SOA's negative TTL, min(SOA TTL, SOA MINIMUM) as RFC 2308 §5 says,
 * capped at maxNegativeTtl; a negative answer without a SOA is not kept
 * (RFC 2308 §5: SHOULD NOT be cached). Every record handed out carries the
 * entry's remaining TTL, so a client never keeps an answer longer than the
 * upstream allowed. SERVFAIL and other failures are never kept.
 */
import type { Answer } from 'dns-packet';
import { resolverNow } from './clock.js';
import { Rcode } from './message.js';

export interface CacheLimits {
  readonly cacheEntries: number;
  readonly cacheBytes: number;
  readonly maxTtl: number;
  readonly maxNegativeTtl: number;
}

/** What is kept of an upstream answer: its rcode, its answer section and (for a negative answer) its SOA. */
export interface CacheEntry {
  readonly rcode: number;
  readonly answers: readonly Answer[];
  readonly authorities: readonly Answer[];
  /** When it was received and when it expires, in ms of the cache's clock. */
  readonly storedAt: number;
  readonly expiresAt: number;
  /** Approximate memory it holds, counted against cacheBytes. */
  readonly bytes: number;
  /** The reply last encoded from it (pipeline.ts), which lives and goes with it. */
  template: ReplyTemplate | undefined;
}

/** A reply encoded from an entry, given again with another id and the TTL left (pipeline.ts). */
export interface ReplyTemplate {
  /** What it answers: a template answers only the query it was made for (the same bytes on the same transport). */
  readonly memo: object;
  readonly bytes: Buffer;
  /** Where each TTL lies in `bytes`. */
  readonly ttlAt: readonly number[];
}

/**
 * Where the cache keeps one stored entry: `entry` while it is stored,
 * undefined from when it is replaced, evicted, expired or cleared. Held in
 * place of the entry (a reply kept for it, pipeline.ts), it says whether the
 * entry is still the cache's without keeping it alive or looking its key up.
 */
export interface CacheHold {
  readonly entry: CacheEntry | undefined;
}

/** An entry as a client gets it: records with the TTL that remains. */
export interface CachedAnswer {
  readonly rcode: number;
  readonly answers: readonly Answer[];
  readonly authorities: readonly Answer[];
  /** Seconds left. */
  readonly ttl: number;
  /** The entry it was read from (a cache hit): every view of one entry has the same records but for their TTL. */
  readonly entry?: CacheEntry;
  /** And where the cache keeps it. */
  readonly hold?: CacheHold;
}

export interface CacheStats {
  readonly entries: number;
  readonly bytes: number;
  readonly hits: number;
  readonly misses: number;
  readonly evictions: number;
  readonly expired: number;
}

export function cacheKey(name: string, type: string, klass = 'IN'): string {
  return `${name}\u0000${type}\u0000${klass}`;
}

/** Per-entry overhead beyond the wire bytes: the key, the Map slot, the decoded objects. */
const ENTRY_OVERHEAD = 256;

/**
 * How long an answer may be kept (seconds), or undefined when it may not:
 * a failure, a TTL of 0, a negative answer without a SOA.
 */
export function cacheTtl(
  questionType: string,
  rcode: number,
  answers: readonly Answer[],
  authorities: readonly Answer[],
  limits: CacheLimits,
): number | undefined {
  if (rcode !== Rcode.NoError && rcode !== Rcode.NxDomain) return undefined;
  let ttl = Infinity;
  for (const record of answers) if (record.type !== 'OPT') ttl = Math.min(ttl, record.ttl ?? 0);
  if (isNegative(questionType, rcode, answers)) {
    const soa = authorities.find((record) => record.type === 'SOA');
    if (soa?.type !== 'SOA') return undefined;
    ttl = Math.min(ttl, soa.ttl ?? 0, soa.data.minimum ?? 0, limits.maxNegativeTtl);
  } else {
    ttl = Math.min(ttl, limits.maxTtl);
  }
  return ttl >= 1 ? Math.floor(ttl) : undefined;
}

/** NXDOMAIN, or an answer with nothing but the CNAME chain to a name without data of the asked type (RFC 2308 §2.2). */
function isNegative(questionType: string, rcode: number, answers: readonly Answer[]): boolean {
  return rcode === Rcode.NxDomain || !answers.some((record) => record.type !== 'OPT' && (record.type !== 'CNAME' || questionType === 'CNAME'));
}

/** An entry for an answer to a question of `questionType` received at `now`, or undefined when it may not be kept. `wireBytes`: the answer's size on the wire. */
export function cacheEntry(
  questionType: string,
  message: { rcode: number; answers: readonly Answer[]; authorities: readonly Answer[] },
  wireBytes: number,
  now: number,
  limits: CacheLimits,
): CacheEntry | undefined {
  const ttl = cacheTtl(questionType, message.rcode, message.answers, message.authorities, limits);
  if (ttl === undefined) return undefined;
  const negative = isNegative(questionType, message.rcode, message.answers);
  return {
    rcode: message.rcode,
    answers: message.answers.filter((record) => record.type !== 'OPT'),
    // Only a negative answer's SOA is worth keeping: it tells the client how long to keep the negative answer.
    authorities: negative ? message.authorities.filter((record) => record.type === 'SOA') : [],
    storedAt: now,
    expiresAt: now + ttl * 1000,
    bytes: wireBytes + ENTRY_OVERHEAD,
    template: undefined,
  };
}

/** Seconds left of `entry` at `now` (whole seconds, rounded down, so a TTL handed out never outlives the upstream's). */
export function remainingTtl(entry: CacheEntry, now: number): number {
  return Math.floor((entry.expiresAt - now) / 1000);
}

/** The entry's records as a client gets them at `now`. */
export function viewOf(entry: CacheEntry, now: number): CachedAnswer {
  const ttl = Math.max(0, remainingTtl(entry, now));
  const withTtl = (record: Answer): Answer => (record.type === 'OPT' ? record : { ...record, ttl });
  return { rcode: entry.rcode, answers: entry.answers.map(withTtl), authorities: entry.authorities.map(withTtl), ttl };
}

interface Slot extends CacheHold {
  entry: CacheEntry | undefined;
  /** Hit since it was stored or last passed over by eviction. */
  used: boolean;
}

export class DnsCache {
  // A Map iterates in insertion order: its first key is the one stored (or passed over) longest ago.
  private readonly entries = new Map<string, Slot>();
  private readonly views = new WeakMap<CacheEntry, CachedAnswer>();
  private bytes = 0;
  private hits = 0;
  private misses = 0;
  private evictions = 0;
  private expired = 0;

  constructor(
    private readonly limits: CacheLimits,
    private readonly now: () => number = resolverNow,
  ) {}

  /** The answer for `key` with its remaining TTL, or undefined (absent, or less than a second left). */
  get(key: string): CachedAnswer | undefined {
    const slot = this.entries.get(key);
    if (slot === undefined) {
      this.misses++;
      return undefined;
    }
    const entry = slot.entry!;
    const now = this.now();
    const ttl = remainingTtl(entry, now);
    if (ttl < 1) {
      this.remove(key, slot);
      this.expired++;
      this.misses++;
      return undefined;
    }
    slot.used = true;
    this.hits++;
    // One view per entry and second: its records are the same for every hit of that second, and the pipeline keeps what it derives from them by the view.
    const seen = this.views.get(entry);
    if (seen?.ttl === ttl) return seen;
    const view = { ...viewOf(entry, now), entry, hold: slot };
    this.views.set(entry, view);
    return view;
  }

  /**
   * The entry `hold` keeps if it is still stored and `get` would give it at
   * `now` (a second or more left), counted and marked as a hit of `get` is;
   * otherwise undefined, and nothing counted. `now` is read by the caller,
   * which must read the cache's clock (the resolver's pipeline and cache
   * share resolverNow).
   */
  reuse(hold: CacheHold, now: number): CacheEntry | undefined {
    const entry = hold.entry;
    if (entry === undefined || remainingTtl(entry, now) < 1) return undefined;
    (hold as Slot).used = true;
    this.hits++;
    return entry;
  }

  set(key: string, entry: CacheEntry): void {
    const old = this.entries.get(key);
    if (old !== undefined) this.remove(key, old);
    if (entry.bytes > this.limits.cacheBytes || this.limits.cacheEntries < 1) return;
    // Room first, then the entry: an entry moved to the end for its second chance never passes the one being stored.
    while (this.entries.size + 1 > this.limits.cacheEntries || this.bytes + entry.bytes > this.limits.cacheBytes) {
      const oldest = this.entries.entries().next();
      if (oldest.done === true) break;
      const [oldestKey, slot] = oldest.value;
      // Hit since it was last looked at here: a second chance, at the end. Each entry is passed over at most once per eviction, so this ends.
      if (slot.used) {
        slot.used = false;
        this.entries.delete(oldestKey);
        this.entries.set(oldestKey, slot);
        continue;
      }
      this.remove(oldestKey, slot);
      this.evictions++;
    }
    this.entries.set(key, { entry, used: false });
    this.bytes += entry.bytes;
  }

  clear(): void {
    for (const slot of this.entries.values()) slot.entry = undefined;
    this.entries.clear();
    this.bytes = 0;
  }

  stats(): CacheStats {
    return { entries: this.entries.size, bytes: this.bytes, hits: this.hits, misses: this.misses, evictions: this.evictions, expired: this.expired };
  }

  private remove(key: string, slot: Slot): void {
    this.entries.delete(key);
    this.bytes -= slot.entry!.bytes;
    slot.entry = undefined;
  }
}
