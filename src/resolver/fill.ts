/**
 * What an answer teaches the table: every address of an answer goes into the
 * sets of every rule whose names cover a name of the answer's CNAME chain,
 * before the reply leaves (the resolver awaits `learn`), so the first
 * connection after a lookup is judged by the rule that names it.
 *
 * The kernel's element timeout is the answer's TTL clamped into
 * [floor, cap] (one second more where the TTL is the timeout: see
 * writeFor). A write is skipped where the kernel already holds the
 * element as long as this answer asks (a warm cache costs no netlink round
 * trip, and `learn` returns without a promise: the resolver answers at
 * once); never where the element would expire before the TTL the answer
 * gives. Exact where that TTL is the timeout; where the floor or the cap
 * changed it, an element is renewed once it falls a tenth short (bounds the
 * writes for short TTLs under the floor).
 *
 * What it skips on is its own record of what it wrote, which someone else
 * can make stale: a re-apply that makes new sets (new live names: `update`
 * forgets the record) or an element deleted by hand (`nft delete element`),
 * which nothing tells it. For that, an element is also written again once
 * less than half of the time it was last written with remains: one deleted
 * by hand is back with the next answer after that, and an element costs
 * ~log2(timeout / floor) writes more over its life, not one per answer.
 *
 * Shared addresses: by default an address a denied name answered stays in
 * the deny rule's set whatever else it answers (a CDN front for a tracker
 * and for a page). A deny rule with `sharedAddresses: spare` leaves out an
 * address that also answers a name it does not deny, and takes it out again
 * when such a name answers it later.
 */
import { isIPv6 } from 'node:net';
import type { DnsBinding } from '../compile/compile.js';
import type { ElementRemoval, ElementWrite } from '../nft/set-elements.js';
import { canonicalAddress } from './memory.js';
import { cnameChain, normalizeName } from './message.js';
import type { AnswerRecord, Question } from './server.js';
import { resolverNow } from './clock.js';

export interface FillView {
  readonly bindings: readonly DnsBinding[];
  /** Indices into `bindings` of the rules whose names cover any name of the chain. */
  bindingsFor(chain: readonly string[]): readonly number[];
  /** Compiled set name (`…_dns4`) → its live names (`…_dns4.<digest>`; two while an apply is between switch and clean-up). */
  readonly liveNames: ReadonlyMap<string, readonly string[]>;
  readonly ttlFloor: number;
  readonly ttlCap: number;
}

export interface FillWriter {
  add(writes: readonly ElementWrite[]): Promise<void>;
  remove(removals: readonly ElementRemoval[]): Promise<void>;
}

/** The chains (question first) that led to an address, as the address memory keeps them. */
export interface SharedLookup {
  sharedWith(address: string): string[][];
}

export interface FillCounters {
  answers: number;
  addressesSeen: number;
  elementsWritten: number;
  writesSkipped: number;
  spared: number;
  transactions: number;
  failures: number;
}

/** Of `written`: when the kernel's element expires (ms) and the timeout it was last written with (ms). */
interface Written {
  readonly expires: number;
  readonly span: number;
  /** The write that puts it there, until the kernel acknowledged it: an answer that needs the element waits for it too. */
  pending?: Promise<void> | undefined;
}

/** An element an answer belongs in (one live set, one address), worked out once per answer's records. */
interface Element {
  readonly key: string;
  readonly set: string;
  readonly address: string;
  readonly ttl: number;
  readonly comment: string;
  /** Index of its binding, for a sparing rule's check. */
  readonly binding: number;
}

/** What an answer's records mean for the table under one view: the name index asked once per records array, not per query. */
interface Plan {
  readonly generation: number;
  readonly covering: readonly number[];
  readonly addresses: readonly AnswerRecord[];
  readonly elements: readonly Element[];
}

/**
 * The set of a binding an address (canonicalAddress) goes into, by the
 * family the kernel sends it as: an IPv4-mapped AAAA (::ffff:192.0.2.7)
 * leaves a dual-stack socket as IPv4 to 192.0.2.7, which only the IPv4 set
 * can match.
 */
function setOf(binding: DnsBinding, address: string): string {
  return isIPv6(address) ? binding.set6 : binding.set4;
}

/** Of the time an element was last written with, what must remain for an answer to skip writing it again (see the module's comment). */
const RECHECK_FRACTION = 0.5;

export class SetFiller {
  readonly counters: FillCounters = { answers: 0, addressesSeen: 0, elementsWritten: 0, writesSkipped: 0, spared: 0, transactions: 0, failures: 0 };
  /** Live set + address → what the kernel's element holds, as last written. */
  private readonly written = new Map<string, Written>();
  /** When `written` is next swept of what has expired: it holds one entry per element, not more. */
  private sweepAt = 4096;
  private view: FillView;
  /** Bumped by `update`: a plan of an older view names old sets and rules. */
  private generation = 0;
  /** Whether any rule of the view spares shared addresses: then every answer asks the address memory. */
  private sparing: boolean;
  /** Keyed by the records array: the resolver hands the same one for every hit of a cache entry within a second. */
  private readonly plans = new WeakMap<readonly AnswerRecord[], Plan>();

  constructor(
    view: FillView,
    private readonly writer: FillWriter,
    private readonly shared: SharedLookup | undefined,
    private readonly now: () => number = resolverNow,
  ) {
    this.view = view;
    this.sparing = view.bindings.some((b) => b.sharedAddresses === 'spare');
  }

  /**
   * A re-apply, or live names read again: new rules, new live names. What
   * this process wrote is forgotten — a set can come back empty under the
   * same name (a release, then an apply) — so the next answer of every
   * address writes it again, and `relearn` writes what the memory holds.
   */
  update(view: FillView): void {
    this.written.clear();
    this.view = view;
    this.generation++;
    this.sparing = view.bindings.some((b) => b.sharedAddresses === 'spare');
  }

  /**
   * Call after the memory has this answer: `shared` then knows every chain
   * leading to its addresses. Undefined, synchronously, when the kernel
   * already holds everything this answer asks for (see the module's
   * comment); otherwise a promise of the writes, settled once the kernel
   * acknowledged them — its own, and those another answer started for an
   * element this one needs (a CDN address two names share): the kernel
   * holds an element only once its write is acknowledged.
   */
  learn(question: Question, records: readonly AnswerRecord[]): Promise<void> | undefined {
    this.counters.answers++;
    const plan = this.planFor(question, records);
    if (plan.addresses.length === 0) return undefined;
    this.counters.addressesSeen += plan.addresses.length;
    const now = this.now();
    this.sweep(now);
    let writes: ElementWrite[] | undefined;
    let inFlight: Promise<void>[] | undefined;
    for (const element of plan.elements) {
      if (this.sparing && this.view.bindings[element.binding]?.sharedAddresses === 'spare' && this.answersOtherNames(element.binding, element.address)) {
        this.counters.spared++;
        continue;
      }
      const write = this.writeFor(element.key, element.set, element.address, element.ttl, element.comment, now);
      if (write !== undefined) (writes ??= []).push(write);
      else {
        const pending = this.written.get(element.key)?.pending;
        if (pending !== undefined) (inFlight ??= []).push(pending);
      }
    }
    const removals = this.sparing ? this.sparedNow(plan.covering, plan.addresses) : [];
    if (writes === undefined && removals.length === 0) return inFlight === undefined ? undefined : Promise.all(inFlight).then(() => undefined);
    // The writes are tracked apart from the removals: an answer waiting for an element waits for its write, not for another rule's removal.
    const wrote = writes === undefined ? undefined : this.write(writes);
    if (wrote !== undefined) this.track(writes!, wrote);
    const committed = removals.length === 0 ? wrote! : this.removeAfter(wrote, removals);
    return inFlight === undefined ? committed : Promise.all([committed, ...inFlight]).then(() => undefined);
  }

  /**
   * Until when (ms of the filler's clock) `learn(question, records)` would
   * write nothing and wait for nothing — and so would learn for the same
   * records with the TTL they have left later, where they count down to
   * `expiresAt` (a cache entry's: at time t its TTL is
   * ⌊(expiresAt − t) / 1000⌋) — as long as nothing else changes the
   * filler's record (an update; a write that fails). `now` or earlier when
   * it would write or wait now, and when a rule spares shared addresses
   * (what it decides then depends on other answers). Another answer's write
   * of the same element never shortens what the kernel holds (a longer
   * timeout only), though learn would wait for it while it is on its way.
   */
  quietUntil(question: Question, records: readonly AnswerRecord[], expiresAt?: number): number {
    const now = this.now();
    if (this.sparing) return now;
    let until = Infinity;
    for (const element of this.planFor(question, records).elements) {
      const held = this.written.get(element.key);
      if (held === undefined || held.pending !== undefined) return now;
      const { fixed, followsTtl } = this.terms(element.ttl);
      until = Math.min(until, held.expires - Math.max(fixed, held.span * RECHECK_FRACTION));
      // What follows the TTL is needed until `now + ttl` for these records, and never past expiresAt as they count down.
      if (followsTtl && !(expiresAt !== undefined && held.expires >= expiresAt)) until = Math.min(until, held.expires - element.ttl * 1000);
      // Counting down, a TTL changes how it is held where it falls to the cap (then the whole TTL, not the cap less a tenth) and
      // under the floor (then the floor less a tenth): no sooner than these.
      if (expiresAt !== undefined && element.ttl > this.view.ttlCap) until = Math.min(until, expiresAt - (this.view.ttlCap + 1) * 1000);
      if (expiresAt !== undefined && element.ttl >= this.view.ttlFloor) until = Math.min(until, expiresAt - this.view.ttlFloor * 1000);
    }
    return until;
  }

  /** Marks each of `writes` as on its way until `done` settles. */
  private track(writes: readonly ElementWrite[], done: Promise<void>): void {
    const held: Written[] = [];
    for (const w of writes) {
      const record = this.written.get(`${w.set}|${w.address}`);
      if (record === undefined) continue;
      record.pending = done;
      held.push(record);
    }
    const settled = (): void => {
      for (const record of held) if (record.pending === done) record.pending = undefined;
    };
    done.then(settled, settled);
  }

  /** Re-adds remembered addresses into sets a re-apply made anew (same names, new rules), so none waits for its next lookup. */
  async relearn(entries: Iterable<{ readonly address: string; readonly chain: readonly string[]; readonly ttl: number }>): Promise<number> {
    const writes: ElementWrite[] = [];
    const now = this.now();
    this.sweep(now);
    for (const entry of entries) {
      const last = entry.chain[entry.chain.length - 1] ?? '';
      const record: AnswerRecord = { name: last, type: isIPv6(entry.address) ? 'AAAA' : 'A', ttl: entry.ttl, data: entry.address };
      const covering = this.view.bindingsFor(entry.chain);
      for (const element of this.elementsOf(entry.chain, covering, [record])) {
        if (this.view.bindings[element.binding]?.sharedAddresses === 'spare' && this.answersOtherNames(element.binding, element.address)) {
          this.counters.spared++;
          continue;
        }
        const write = this.writeFor(element.key, element.set, element.address, element.ttl, element.comment, now);
        if (write !== undefined) writes.push(write);
      }
    }
    let sent = 0;
    const all = (async () => {
      for (; sent < writes.length; sent += 4096) await this.write(writes.slice(sent, sent + 4096));
    })();
    this.track(writes, all);
    try {
      await all;
    } catch (error) {
      // write() forgot the chunk that failed; the chunks after it were recorded and never sent: not held either.
      for (const w of writes.slice(sent + 4096)) this.written.delete(`${w.set}|${w.address}`);
      throw error;
    }
    return writes.length;
  }

  private async removeAfter(wrote: Promise<void> | undefined, removals: readonly ElementRemoval[]): Promise<void> {
    if (wrote !== undefined) await wrote;
    await this.writer.remove(removals);
    // Known gone only once the kernel said so: a removal that failed is tried again with the next such answer.
    for (const r of removals) this.written.delete(`${r.set}|${r.address}`);
  }

  private planFor(question: Question, records: readonly AnswerRecord[]): Plan {
    const known = this.plans.get(records);
    if (known !== undefined && known.generation === this.generation) return known;
    const chain = cnameChain(
      normalizeName(question.name),
      records.map((r) => (r.type === 'CNAME' ? { ...r, name: normalizeName(r.name), data: normalizeName(r.data) } : r)),
    );
    const inChain = new Set(chain);
    const addresses = records.filter((r) => (r.type === 'A' || r.type === 'AAAA') && inChain.has(normalizeName(r.name)));
    const covering = addresses.length === 0 ? [] : this.view.bindingsFor(chain);
    const plan: Plan = { generation: this.generation, covering, addresses, elements: this.elementsOf(chain, covering, addresses) };
    this.plans.set(records, plan);
    return plan;
  }

  /** `covering`: the bindings whose names cover a name of `chain` (the view's bindingsFor). */
  private elementsOf(chain: readonly string[], covering: readonly number[], addresses: readonly AnswerRecord[]): Element[] {
    const { bindings, liveNames } = this.view;
    const elements: Element[] = [];
    for (const index of covering) {
      const binding = bindings[index];
      if (!binding) continue;
      for (const r of addresses) {
        const comment = normalizeName(r.name) === chain[0] ? chain[0] : `${chain[0]} > ${normalizeName(r.name)}`;
        const address = canonicalAddress(r.data);
        for (const set of liveNames.get(setOf(binding, address)) ?? [])
          elements.push({ key: `${set}|${address}`, set, address, ttl: r.ttl, comment, binding: index });
      }
    }
    return elements;
  }

  private sweep(now: number): void {
    if (this.written.size < this.sweepAt) return;
    for (const [key, held] of this.written) if (held.expires <= now) this.written.delete(key);
    this.sweepAt = Math.max(4096, this.written.size * 2);
  }

  /**
   * For an answer of `ttl` seconds: the element's timeout (s), and how far
   * past the time of the answer the element must hold (ms): `fixed`, and,
   * where `followsTtl`, the TTL itself too (whichever is more). Exact where
   * the TTL is the timeout; where the floor or the cap changed it, a
   * tenth's slack (bounds the writes), and under the floor never below the
   * answer's own TTL.
   */
  private terms(ttl: number): { timeout: number; fixed: number; followsTtl: boolean } {
    const { ttlFloor, ttlCap } = this.view;
    const seconds = Math.min(ttlCap, Math.max(ttlFloor, ttl));
    // Where the TTL is the timeout, one second more (within the cap): a cached answer's TTL counts down in whole seconds, rounded
    // down, so an element written for exactly `ttl` falls short of the next hit of the same second, and would be written again
    // for nearly every hit; with the second, it outlives every later answer of the same cache entry, by less than a second.
    if (seconds === ttl) return { timeout: Math.min(ttlCap, ttl + 1), fixed: 0, followsTtl: true };
    const slack = Math.max(1000, seconds * 100);
    return { timeout: seconds, fixed: seconds * 1000 - slack, followsTtl: ttl < seconds };
  }

  /** The write an answer of `ttl` seconds needs for this element at `now`, recorded as done; undefined when the kernel holds it long enough. */
  private writeFor(key: string, set: string, address: string, ttl: number, comment: string, now: number): ElementWrite | undefined {
    const { timeout, fixed, followsTtl } = this.terms(ttl);
    const lead = followsTtl ? Math.max(fixed, ttl * 1000) : fixed;
    const held = this.written.get(key);
    // Held long enough for this answer, and not yet half its time gone (see the module's comment): the test quietUntil looks ahead with.
    if (held !== undefined && now <= held.expires - Math.max(lead, held.span * RECHECK_FRACTION)) {
      this.counters.writesSkipped++;
      return undefined;
    }
    this.written.set(key, { expires: now + timeout * 1000, span: timeout * 1000 });
    return { set, address, timeoutMs: timeout * 1000, comment };
  }

  /** Whether a chain the rule at `index` does not cover also led to `address`. */
  private answersOtherNames(index: number, address: string): boolean {
    return (this.shared?.sharedWith(address) ?? []).some((chain) => !this.view.bindingsFor(chain).includes(index));
  }

  /** Addresses of this answer that a sparing rule (which does not cover this chain) holds from an earlier answer: out they go. */
  private sparedNow(coveringChain: readonly number[], addresses: readonly AnswerRecord[]): ElementRemoval[] {
    const { bindings, liveNames } = this.view;
    const covering = new Set(coveringChain);
    const removals: ElementRemoval[] = [];
    bindings.forEach((binding, index) => {
      if (binding.sharedAddresses !== 'spare' || covering.has(index)) return;
      for (const r of addresses) {
        const address = canonicalAddress(r.data);
        for (const set of liveNames.get(setOf(binding, address)) ?? []) {
          if (!this.written.has(`${set}|${address}`)) continue;
          removals.push({ set, address });
          this.counters.spared++;
        }
      }
    });
    return removals;
  }

  private async write(writes: readonly ElementWrite[]): Promise<void> {
    this.counters.transactions++;
    try {
      await this.writer.add(writes);
      this.counters.elementsWritten += writes.length;
    } catch (error) {
      this.counters.failures++;
      // Not known to be written: the next answer tries again.
      for (const w of writes) this.written.delete(`${w.set}|${w.address}`);
      throw error;
    }
  }
}
