/**
 * What an answer teaches the table: every address of an answer goes into the
 * sets of every rule whose names cover a name of the answer's CNAME chain,
 * before the reply leaves (the resolver awaits `learn`), so the first
 * connection after a lookup is judged by the rule that names it.
 *
 * The kernel's element timeout is the answer's TTL clamped into
 * [floor, cap]. A write is skipped where the kernel already holds the
 * element nearly as long as this answer asks (a warm cache costs no netlink
 * round trip); never where the element would expire sooner.
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
import { cnameChain, normalizeName } from './message.js';
import type { AnswerRecord, Question } from './server.js';

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

export class SetFiller {
  readonly counters: FillCounters = { answers: 0, addressesSeen: 0, elementsWritten: 0, writesSkipped: 0, spared: 0, transactions: 0, failures: 0 };
  /** Live set + address → when the kernel's element expires (ms), as last written. */
  private readonly written = new Map<string, number>();
  /** When `written` is next swept of what has expired: it holds one entry per element, not more. */
  private sweepAt = 4096;
  private view: FillView;

  constructor(
    view: FillView,
    private readonly writer: FillWriter,
    private readonly shared: SharedLookup | undefined,
    private readonly now: () => number = Date.now,
  ) {
    this.view = view;
  }

  /**
   * A re-apply: new rules, new live names. What this process wrote is
   * forgotten — a set can come back empty under the same name (a release,
   * then an apply) — and `relearn` writes what the memory holds again.
   */
  update(view: FillView): void {
    this.written.clear();
    this.view = view;
  }

  /** Call after the memory has this answer: `shared` then knows every chain leading to its addresses. */
  async learn(question: Question, records: readonly AnswerRecord[]): Promise<void> {
    this.counters.answers++;
    const chain = cnameChain(
      normalizeName(question.name),
      records.map((r) => (r.type === 'CNAME' ? { ...r, name: normalizeName(r.name), data: normalizeName(r.data) } : r)),
    );
    const inChain = new Set(chain);
    const addresses = records.filter((r) => (r.type === 'A' || r.type === 'AAAA') && inChain.has(normalizeName(r.name)));
    if (addresses.length === 0) return;
    this.counters.addressesSeen += addresses.length;
    const covering = this.view.bindingsFor(chain);
    const writes = this.writesFor(chain, covering, addresses);
    const removals = this.sparedNow(covering, addresses);
    if (writes.length > 0) await this.write(writes);
    if (removals.length > 0) {
      await this.writer.remove(removals);
      // Known gone only once the kernel said so: a removal that failed is tried again with the next such answer.
      for (const r of removals) this.written.delete(`${r.set}|${r.address}`);
    }
  }

  /** Re-adds remembered addresses into sets a re-apply made anew (same names, new rules), so none waits for its next lookup. */
  async relearn(entries: Iterable<{ readonly address: string; readonly chain: readonly string[]; readonly ttl: number }>): Promise<number> {
    const writes: ElementWrite[] = [];
    for (const entry of entries) {
      const last = entry.chain[entry.chain.length - 1] ?? '';
      writes.push(
        ...this.writesFor(entry.chain, this.view.bindingsFor(entry.chain), [
          { name: last, type: isIPv6(entry.address) ? 'AAAA' : 'A', ttl: entry.ttl, data: entry.address },
        ]),
      );
    }
    for (let at = 0; at < writes.length; at += 4096) await this.write(writes.slice(at, at + 4096));
    return writes.length;
  }

  /** `covering`: the bindings whose names cover a name of `chain` (the view's bindingsFor). */
  private writesFor(chain: readonly string[], covering: readonly number[], addresses: readonly AnswerRecord[]): ElementWrite[] {
    const { bindings, liveNames, ttlFloor, ttlCap } = this.view;
    const now = this.now();
    if (this.written.size >= this.sweepAt) {
      for (const [key, expires] of this.written) if (expires <= now) this.written.delete(key);
      this.sweepAt = Math.max(4096, this.written.size * 2);
    }
    const writes: ElementWrite[] = [];
    for (const index of covering) {
      const binding = bindings[index];
      if (!binding) continue;
      for (const r of addresses) {
        if (binding.sharedAddresses === 'spare' && this.answersOtherNames(index, r.data)) {
          this.counters.spared++;
          continue;
        }
        const seconds = Math.min(ttlCap, Math.max(ttlFloor, r.ttl));
        const expires = now + seconds * 1000;
        // Skipped only if the kernel keeps it nearly as long already; the slack bounds writes for TTLs under the floor.
        const slack = Math.max(1000, seconds * 100);
        for (const set of liveNames.get(isIPv6(r.data) ? binding.set6 : binding.set4) ?? []) {
          const key = `${set}|${r.data}`;
          const known = this.written.get(key);
          if (known !== undefined && known >= expires - slack) {
            this.counters.writesSkipped++;
            continue;
          }
          const comment = normalizeName(r.name) === chain[0] ? chain[0] : `${chain[0]} > ${normalizeName(r.name)}`;
          writes.push({ set, address: r.data, timeoutMs: seconds * 1000, comment });
          this.written.set(key, expires);
        }
      }
    }
    return writes;
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
        for (const set of liveNames.get(isIPv6(r.data) ? binding.set6 : binding.set4) ?? []) {
          if (!this.written.has(`${set}|${r.data}`)) continue;
          removals.push({ set, address: r.data });
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
