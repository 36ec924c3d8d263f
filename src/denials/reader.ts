/**
 * The denial reader: NFLOG packets of egressd's log group, read in this
 * process (nflog.ts), parsed (parse.ts), counted into aggregates
 * (aggregate.ts) and attributed to their rule and name (attribute.ts), then
 * handed to every subscriber of the feed (the store, the D-Bus Denied
 * signal).
 *
 * The event loop never waits on the socket: poll(2) waits on libuv's thread
 * pool (one thread, the way libnftables calls go there too), and the main
 * thread drains what is queued without blocking, a bounded number of
 * datagrams per turn. A worker thread doing blocking recv would need its own
 * entry file and would post every batch back; the work per packet here is a
 * few microseconds, so one round trip per wake-up is the cheaper path.
 *
 * Loss is never silent: the kernel's sequence numbers (NFULA_SEQ) show every
 * packet that it logged and we did not read (`lost`, in `sequenceGaps`
 * runs), and each overflow of the socket is counted (`enobufs`).
 */
import type { Logger } from 'pino';
import type { Part, PartContext, PartSpec } from '../daemon/part.js';
import type { InForce } from '../resolver/runtime.js';
import { readRuleTable } from '../state/rule-table.js';
import { NetlinkError } from '../system/netlink.js';
import { Aggregator, type Aggregate, type AggregatorOptions } from './aggregate.js';
import { appOfUid, attribute, RuleLookup, type LearnedNames } from './attribute.js';
import { openNflog, type NflogOptions, type NflogSocket } from './nflog.js';
import { parseDatagram, type DenialEvent } from './parse.js';
import type { DenialRecord } from './record.js';

export interface DenialCounters {
  readonly events: number;
  readonly records: number;
  readonly lost: number;
  readonly enobufs: number;
  readonly sequenceGaps: number;
  readonly unparsed: number;
}

export interface DenialFeed {
  /** Every record as it is made: the first packet of a new (identity, destination, rule) at once (count 1), so people are told at once; the rest as one aggregate when its window closes. The counts of all records add up to the packets logged. */
  subscribe(listener: (record: DenialRecord) => void): () => void;
  counters(): DenialCounters;
}

export interface DenialReaderOptions extends AggregatorOptions, NflogOptions {
  /** Events (packets, not datagrams: one datagram holds up to 256) read per event-loop turn before yielding. Default 512. */
  readonly eventsPerTurn?: number;
  /** Milliseconds one turn may take before yielding, whatever its count. Default 5. */
  readonly turnBudgetMs?: number;
}

/** What one turn of draining read, and whether it stopped with more perhaps waiting (a limit reached) rather than at an empty socket. */
export interface DrainTurn {
  readonly datagrams: number;
  readonly events: number;
  readonly more: boolean;
}

/**
 * One turn: whole datagrams (so no event is split across turns and the
 * sequence accounting stays exact) until the socket is empty or the turn
 * has read `eventsPerTurn` events or taken `budgetMs`. Every record the
 * events close is published inside the turn, with the journal, store and
 * D-Bus work of each, so the limit is on events, not datagrams: 64
 * datagrams of 256 packets was 16k records in one turn.
 */
export function drainTurn(
  receive: () => Buffer | undefined,
  take: (bytes: Buffer) => number,
  overflow: () => void,
  limits: { readonly eventsPerTurn: number; readonly budgetMs: number },
  clock: () => number = () => performance.now(),
): DrainTurn {
  const start = clock();
  let datagrams = 0;
  let events = 0;
  for (;;) {
    if (events >= limits.eventsPerTurn || clock() - start >= limits.budgetMs) return { datagrams, events, more: true };
    let bytes: Buffer | undefined;
    try {
      bytes = receive();
    } catch (error) {
      if (error instanceof NetlinkError && error.errno === ENOBUFS) {
        overflow();
        continue;
      }
      throw error;
    }
    if (bytes === undefined) return { datagrams, events, more: false };
    events += take(bytes);
    datagrams++;
  }
}

const ENOBUFS = 105;
/** How long one poll waits on the thread pool: bounds how long `close` waits for it. */
const POLL_MS = 250;

/**
 * The feed: subscribers and counters that outlive a restart of the part,
 * so the store subscribes once and the counters keep counting.
 */
export class DenialFeedHub implements DenialFeed {
  private readonly listeners = new Set<(record: DenialRecord) => void>();
  readonly count = { events: 0, records: 0, lost: 0, enobufs: 0, sequenceGaps: 0, unparsed: 0 };

  constructor(private readonly log?: Logger) {}

  subscribe(listener: (record: DenialRecord) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  counters(): DenialCounters {
    return { ...this.count };
  }

  publish(record: DenialRecord): void {
    this.count.records++;
    for (const listener of this.listeners) {
      try {
        listener(record);
      } catch (error) {
        // One subscriber's failure is its own; the others and the reader go on.
        this.log?.error({ err: error }, 'a denial subscriber failed');
      }
    }
  }
}

/** The part of the reader that needs no socket: sequence accounting, aggregation, attribution. Driven by the reader or by tests with datagrams. */
export class DenialPipeline {
  readonly rules = new RuleLookup();
  private readonly aggregator: Aggregator;
  private expectedSeq: number | undefined;

  constructor(
    private readonly hub: DenialFeedHub,
    private readonly learnedNames: LearnedNames,
    options: AggregatorOptions = {},
    private readonly now: () => number = Date.now,
  ) {
    this.aggregator = new Aggregator((aggregate: Aggregate) => hub.publish(attribute(aggregate, this.rules, this.learnedNames)), options);
  }

  get open(): number {
    return this.aggregator.size;
  }

  get closedEarly(): number {
    return this.aggregator.closedEarly;
  }

  /** Returns the number of events the datagram held. */
  datagram(bytes: Uint8Array): number {
    const parsed = parseDatagram(bytes);
    const count = this.hub.count;
    count.unparsed += parsed.unparsed;
    count.enobufs += parsed.overruns;
    const now = this.now();
    for (const event of parsed.events) {
      count.events++;
      this.sequence(event);
      this.aggregator.add(event, now);
    }
    return parsed.events.length;
  }

  /** The socket overflowed: what was lost shows as a sequence gap in the next packet. */
  overflow(): void {
    this.hub.count.enobufs++;
  }

  /** A new binding starts its own sequence. */
  rebound(): void {
    this.expectedSeq = undefined;
  }

  tick(): void {
    this.aggregator.tick(this.now());
  }

  flush(): void {
    this.aggregator.flush();
  }

  private sequence(event: DenialEvent): void {
    if (event.seq === undefined) return;
    if (this.expectedSeq !== undefined && event.seq !== this.expectedSeq) {
      const gap = (event.seq - this.expectedSeq) >>> 0;
      // Netlink keeps order: a "gap" of more than half the space is a sequence that restarted, not loss.
      if (gap < 0x80000000) {
        this.hub.count.lost += gap;
        this.hub.count.sequenceGaps++;
      }
    }
    this.expectedSeq = (event.seq + 1) >>> 0;
  }
}

export interface DenialReader extends Part, DenialFeed {
  /** The aggregates open now (bounded by maxOpen). */
  readonly open: number;
  readonly group: number;
}

/**
 * Binds the policy's log group in this network namespace and reads it until
 * `close`. Rules come from rules.json in `stateDir` and the policy in force;
 * both are read again on `update`, and the group re-bound if the policy names
 * another.
 */
export function startDenialReader(
  inForce: InForce,
  context: Pick<PartContext, 'log' | 'stateDir' | 'learnedNames'>,
  options: DenialReaderOptions = {},
  hub: DenialFeedHub = new DenialFeedHub(context.log),
): Promise<DenialReader> {
  const pipeline = new DenialPipeline(hub, (address, uid) => context.learnedNames(address, uid), options);
  const loadRules = (force: InForce) => {
    pipeline.rules.replace(force.compiled.ruleIds);
    pipeline.rules.senderApp = appOfUid(force.policy, force.facts);
    const table = readRuleTable(context.stateDir);
    if (table.state === 'ok') pipeline.rules.replace(table.value.rules);
    else if (table.state !== 'absent') context.log.warn({ state: table.state }, 'rules.json cannot be read; denials are attributed from the policy in force');
  };
  loadRules(inForce);
  // Mutable from close() and update() while the loop awaits: read through the object, never narrowed.
  const live: { socket: NflogSocket; closing: boolean } = { socket: openNflog(inForce.policy.defaults.log.group, options), closing: false };
  let failed: (error: unknown) => void = () => undefined;
  // Settles only when the reader stops by itself (the daemon then restarts it); a close() is not that.
  const stopped = new Promise((resolve) => (failed = resolve));
  let deliberate = false;
  const limits = { eventsPerTurn: options.eventsPerTurn ?? 512, budgetMs: options.turnBudgetMs ?? 5 };
  const ticker = setInterval(() => pipeline.tick(), Math.min(1000, Math.max(50, (options.windowMs ?? 10_000) / 4)));
  ticker.unref();

  const take = (bytes: Buffer) => pipeline.datagram(bytes);
  for (const early of live.socket.early.splice(0)) take(early);

  const drain = (): boolean =>
    drainTurn(
      () => live.socket.transport.receiveNow(),
      take,
      () => pipeline.overflow(),
      limits,
    ).more;

  // close() and update() change `live` while the loop awaits.
  const stillReading = (socket: NflogSocket) => !live.closing && socket === live.socket;
  const loop = async () => {
    while (!live.closing) {
      const current = live.socket;
      const ready = await current.transport.waitReadable(POLL_MS);
      if (!ready || !stillReading(current)) continue;
      // Drain in turns, yielding between them so that a flood never holds the event loop.
      while (stillReading(current) && drain()) await new Promise((resolve) => setImmediate(resolve));
    }
  };
  const running = loop().catch((error: unknown) => {
    context.log.error({ err: error }, 'the denial reader stopped');
    live.closing = true;
    return error;
  });
  const finished = running.then((error) => {
    clearInterval(ticker);
    pipeline.flush();
    live.socket.close();
    if (!deliberate) failed(error);
  });

  return Promise.resolve({
    get open() {
      return pipeline.open;
    },
    get group() {
      return live.socket.group;
    },
    subscribe: (listener) => hub.subscribe(listener),
    counters: () => hub.counters(),
    stopped,
    update(next) {
      loadRules(next);
      const group = next.policy.defaults.log.group;
      if (group !== live.socket.group && !live.closing) {
        const previous = live.socket;
        // Drain what the old group still holds, then bind the new one: its packets carry its own sequence.
        try {
          for (let bytes = previous.transport.receiveNow(); bytes !== undefined; bytes = previous.transport.receiveNow()) take(bytes);
        } catch {
          /* an overflow of the old group: counted by its gap no more, but the group is going */
        }
        previous.close();
        live.socket = openNflog(group, options);
        pipeline.rebound();
        for (const early of live.socket.early.splice(0)) take(early);
        context.log.info({ from: previous.group, to: group }, 'the denial reader moved to another log group');
      }
      return Promise.resolve();
    },
    async close() {
      deliberate = true;
      live.closing = true;
      await finished;
    },
    describe() {
      const c = hub.counters();
      return `denials: group ${live.socket.group}, ${c.events} read, ${c.records} records, ${c.lost} lost`;
    },
  });
}

/**
 * The reader as a part the daemon starts and restarts: `feed` stays the
 * same across restarts (the store and D-Bus subscribe to it once). The lead
 * combines it with the store into one 'denials' part, or starts it as it is.
 */
export function denialsReaderPart(options: DenialReaderOptions = {}): { spec: PartSpec; feed: DenialFeed } {
  let hub: DenialFeedHub | undefined;
  const feed: DenialFeed = {
    subscribe: (listener) => (hub ??= new DenialFeedHub()).subscribe(listener),
    counters: () => (hub ??= new DenialFeedHub()).counters(),
  };
  const spec: PartSpec = {
    name: 'denials-reader',
    start: (inForce, context) => startDenialReader(inForce, context, options, (hub ??= new DenialFeedHub(context.log))),
  };
  return { spec, feed };
}
