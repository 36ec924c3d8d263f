/**
 * Aggregation of denial events into counted records: the first packet of an
 * (identity, destination, rule) is told at once (count 1), the packets after
 * it within its window become one record when the window closes. Every
 * packet added is in exactly one record, so the counts add up to the packets
 * read. Memory is bounded: at most `maxOpen` aggregates are open; a new one
 * beyond that closes the oldest early (its record is emitted then, counted in
 * `closedEarly`), so a flood of distinct destinations costs records, not
 * memory.
 */
import { aggregateKey } from './record.js';
import type { DenialEvent } from './parse.js';

/** A record before attribution: what the kernel said, counted. */
export interface Aggregate {
  readonly event: DenialEvent;
  readonly firstSeen: number;
  readonly lastSeen: number;
  readonly count: number;
}

interface Open {
  readonly event: DenialEvent;
  readonly opened: number;
  /** Packets after the first, not yet told. */
  count: number;
  firstSeen: number;
  lastSeen: number;
}

export interface AggregatorOptions {
  /** How long after its first packet an aggregate closes. Default 10 s. */
  readonly windowMs?: number;
  /** Aggregates open at once. Default 10,000. */
  readonly maxOpen?: number;
}

export class Aggregator {
  private readonly open = new Map<string, Open>();
  private readonly windowMs: number;
  private readonly maxOpen: number;
  /** Aggregates closed before their window ended because too many were open. */
  closedEarly = 0;

  constructor(
    private readonly emit: (aggregate: Aggregate) => void,
    options: AggregatorOptions = {},
  ) {
    this.windowMs = options.windowMs ?? 10_000;
    this.maxOpen = Math.max(1, options.maxOpen ?? 10_000);
  }

  get size(): number {
    return this.open.size;
  }

  add(event: DenialEvent, now: number): void {
    const key = aggregateKey(event);
    const known = this.open.get(key);
    if (known !== undefined) {
      if (known.count === 0) known.firstSeen = now;
      known.count++;
      known.lastSeen = now;
      return;
    }
    if (this.open.size >= this.maxOpen) {
      // A Map iterates in insertion order, and every window is as long: the first is the oldest.
      const [oldestKey, oldest] = this.open.entries().next().value as [string, Open];
      this.open.delete(oldestKey);
      this.closedEarly++;
      this.close(oldest);
    }
    this.open.set(key, { event, opened: now, count: 0, firstSeen: now, lastSeen: now });
    this.emit({ event, firstSeen: now, lastSeen: now, count: 1 });
  }

  /** Closes the aggregates whose window has ended by `now`. */
  tick(now: number): void {
    for (const [key, entry] of this.open) {
      if (entry.opened + this.windowMs > now) break;
      this.open.delete(key);
      this.close(entry);
    }
  }

  /** Closes every aggregate (the reader stops). */
  flush(): void {
    const all = [...this.open.values()];
    this.open.clear();
    for (const entry of all) this.close(entry);
  }

  private close(entry: Open): void {
    if (entry.count > 0) this.emit({ event: entry.event, firstSeen: entry.firstSeen, lastSeen: entry.lastSeen, count: entry.count });
  }
}
