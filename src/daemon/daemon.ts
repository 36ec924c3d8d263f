/**
 * egressd's life as one object with explicit states, instead of a closure
 * with flags:
 *
 * - `starting`: until the first apply ends with a table in force. If it
 *   fails and no table is in force at all, egressd has nothing to keep and
 *   exits (status 2); if a table from before holds, it goes on, degraded.
 * - `enforcing`: the last apply succeeded, the table it made is in force, and
 *   every part configured on runs.
 * - `reloading`: a re-apply runs (SIGHUP, account changes, a part's
 *   `reload`, such as the D-Bus method); the table in force holds meanwhile.
 * - `degraded`: a table is in force, but the last apply failed (so what holds
 *   is an older policy than the directory's, or, at start, a table from
 *   before this run), or at least one part is not running (it crashed, its
 *   update threw, or its start failed, and it waits for its next start).
 *   Enforcement is whole in this state: the kernel holds the rules; what is
 *   missing is a newer policy or what a part adds (names learned, apps
 *   followed, denials told).
 * - `stopping`: SIGTERM/SIGINT; parts are closed, the rules stay in force
 *   (only `egressctl release` removes them).
 *
 * Parts (part.ts) start once the first apply succeeds, each on its own: a
 * part whose start throws, whose `stopped` settles, or whose `update` throws
 * is logged (`part-failed`), shown in `status` and STATUS, closed, and started
 * again after a back-off — 0.5 s, doubling to at most 60 s, each delay less
 * up to a quarter at random (jitter, so parts failing together do not retry
 * in step); a part that ran a minute without failing starts from 0.5 s again.
 * No part's failure reaches the apply or the table.
 *
 * Reloads are queued: one apply at a time; those asked for while one runs
 * are coalesced into the next, and each caller gets that apply's outcome.
 *
 * Time-limited allows (`allowed:` entries with `until`): every apply leaves
 * out those whose time is up (policy/expiry.ts), and the daemon applies again
 * at the next `until` — itself, whatever parts run. If the directory's policy
 * then does not apply (another file broke meanwhile), the policy in force is
 * applied again without the expired entries (`applyInForce`): the table only
 * loses the allow, nothing else changes, and egressd stays degraded.
 */
import type { Logger } from 'pino';
import type { Applied } from '../enforce/enforcer.js';
import { ErrorCode, isEgressError } from '../errors.js';
import type { Nft } from '../nft/client.js';
import type { Policy } from '../policy/model.js';
import type { NameFor } from '../resolver/memory.js';
import type { InForce } from '../resolver/runtime.js';
import type { DaemonState, DaemonStatus, Part, PartContext, PartReport, PartSpec, ReloadOutcome } from './part.js';
import { enforcingStatus, failedStatus, type Readiness } from './readiness.js';

export interface Backoff {
  /** The delay before the first restart. */
  readonly firstMs: number;
  /** Delays double up to this. */
  readonly maxMs: number;
  /** Each delay is shortened by up to this fraction, at random. */
  readonly jitter: number;
  /** A part that ran this long without failing counts its next failure as its first. */
  readonly healthyAfterMs: number;
}

export const PART_BACKOFF: Backoff = { firstMs: 500, maxMs: 60_000, jitter: 0.25, healthyAfterMs: 60_000 };

/** How long a part may take to start, take an update, or close, before it counts as failed. */
export const PART_TIMEOUT_MS = 10_000;

/** The delay before restart number `failures` (1 for the first failure in a row). */
export function restartDelay(failures: number, backoff: Backoff = PART_BACKOFF, random: () => number = Math.random): number {
  const base = Math.min(backoff.maxMs, backoff.firstMs * 2 ** Math.min(30, Math.max(0, failures - 1)));
  return Math.round(base * (1 - backoff.jitter * random()));
}

/** Where the daemon is in its life, apart from how well it is doing. */
export type Phase = 'starting' | 'running' | 'reloading' | 'stopping';

/** The state from what holds (pure). `running` is reached only with a table in force. */
export function daemonState(phase: Phase, lastApplyFailed: boolean, partsFailing: boolean): DaemonState {
  if (phase !== 'running') return phase;
  return lastApplyFailed || partsFailing ? 'degraded' : 'enforcing';
}

export interface DaemonOptions {
  readonly policyDir: string;
  readonly stateDir: string;
  readonly nft: Nft;
  readonly log: Logger;
  readonly readiness: Readiness;
  /** Applies the policy directory (applyPolicy with the enforcer's deps). */
  readonly apply: () => Promise<Applied>;
  /** Whether a table egressd made is in force (asked after a failed apply). */
  readonly tableInForce: () => Promise<boolean>;
  /** The parts to run, in start order. */
  readonly parts: readonly PartSpec[];
  /** Names of parts configured off: reported as `off`, never started. */
  readonly off?: readonly string[];
  readonly backoff?: Backoff;
  readonly random?: () => number;
  readonly partTimeoutMs?: number;
  /** Applies a policy already loaded (the one in force; expired allows are left out by the apply): used when an allow expired and the directory's policy does not apply. */
  readonly applyInForce?: (policy: Policy) => Promise<Applied>;
  readonly now?: () => number;
  /** The longest wait between two looks at the clock before an allow's `until` (a wall clock set forward is seen within it). Default 60 s. */
  readonly expiryCheckMs?: number;
}

type SlotState = 'waiting' | 'starting' | 'running' | 'restarting' | 'failed' | 'off';

interface Slot {
  readonly name: string;
  readonly spec: PartSpec | undefined;
  state: SlotState;
  part: Part | undefined;
  /** Starts after a failure. */
  restarts: number;
  /** Failures in a row, for the back-off. */
  failures: number;
  startedAt: number;
  timer: NodeJS.Timeout | undefined;
  /** Bumped whenever an instance is given up: a late `stopped` or start of an older one is ignored. */
  generation: number;
  lastError: string | undefined;
}

interface Pending {
  readonly why: string;
  readonly waiters: ((outcome: ReloadOutcome) => void)[];
}

export class Daemon {
  private phase: Phase = 'starting';
  private reported: DaemonState = 'starting';
  private inForceNow: InForce | undefined;
  private applied: (Pick<Applied, 'digest' | 'lockdown'> & { rules: number }) | undefined;
  private lastFailure: { code: string; errors: readonly string[] } | undefined;
  private partsStarted = false;
  private pending: Pending | undefined;
  private draining: Promise<void> | undefined;
  private readonly slots: Slot[];
  /** Part closes under way (each bounded by timeoutMs). */
  private readonly closing = new Set<Promise<void>>();
  private readonly backoff: Backoff;
  private readonly timeoutMs: number;
  /** The earliest `until` of an allow in force, and the timer that applies again then. */
  private expiresAt: number | undefined;
  private expiryTimer: NodeJS.Timeout | undefined;

  constructor(private readonly options: DaemonOptions) {
    this.backoff = options.backoff ?? PART_BACKOFF;
    this.timeoutMs = options.partTimeoutMs ?? PART_TIMEOUT_MS;
    const slot = (name: string, spec: PartSpec | undefined, state: SlotState): Slot => ({
      name,
      spec,
      state,
      part: undefined,
      restarts: 0,
      failures: 0,
      startedAt: 0,
      timer: undefined,
      generation: 0,
      lastError: undefined,
    });
    const off = new Set(options.off);
    this.slots = [
      ...options.parts.filter((spec) => !off.has(spec.name)).map((spec) => slot(spec.name, spec, 'waiting')),
      ...[...off].map((name) => slot(name, undefined, 'off')),
    ];
  }

  get state(): DaemonState {
    return daemonState(this.phase, this.lastFailure !== undefined, this.partsFailing());
  }

  /** The policy in force and what it was compiled against, from this run's last successful apply. */
  get inForce(): InForce | undefined {
    return this.inForceNow;
  }

  /** The first apply (and any reload asked for meanwhile). True when a table is in force and egressd goes on; false when there is nothing to keep. */
  async start(): Promise<boolean> {
    const first = this.reload('start');
    await first;
    await this.draining;
    return this.phase !== 'starting' && !this.stopping();
  }

  /**
   * Re-validate and re-apply, queued behind an apply in progress and
   * coalesced with other requests made meanwhile. A part must not await it
   * inside its own `start` or `update`: that apply waits for the part (it
   * would count as failed after the part timeout).
   */
  reload(why: string): Promise<ReloadOutcome> {
    if (this.stopping()) return Promise.resolve(stoppingOutcome());
    return new Promise((resolve) => {
      if (this.pending) this.pending.waiters.push(resolve);
      else this.pending = { why, waiters: [resolve] };
      this.draining ??= this.drain();
    });
  }

  status(): DaemonStatus {
    return { state: this.state, digest: this.applied?.digest, lockdown: this.applied?.lockdown ?? false, parts: this.slots.map((s) => this.report(s)) };
  }

  /** Names an address was learned from, from the first running part that remembers them; [] when none does. */
  learnedNames(address: string, uid: number | undefined): readonly NameFor[] {
    for (const slot of this.slots) {
      if (slot.state !== 'running' || !slot.part?.learnedNames) continue;
      try {
        const names = slot.part.learnedNames(address, uid);
        if (names.length > 0) return names;
      } catch (error) {
        this.options.log.warn({ event: 'part-error', part: slot.name, error: describeError(error) }, `${slot.name}: could not tell the names of an address`);
      }
    }
    return [];
  }

  /** Closes every part; the rules stay. An apply in progress is let finish (bounded: the swap is safe to cut at any step). */
  async stop(signal: string): Promise<void> {
    if (this.stopping()) return;
    this.phase = 'stopping';
    this.reported = 'stopping';
    clearTimeout(this.expiryTimer);
    this.options.readiness.stopping(signal);
    const pending = this.pending;
    this.pending = undefined;
    for (const resolve of pending?.waiters ?? []) resolve(stoppingOutcome());
    for (const slot of this.slots) {
      clearTimeout(slot.timer);
      slot.generation++;
    }
    // One after the other, in the order they are listed: a part's last words reach the parts after it (the denial reader
    // flushes its open aggregates into the feed on close, and only then may the store behind it close). Each close is bounded.
    for (const slot of this.slots) {
      const part = slot.part;
      slot.part = undefined;
      if (part) await this.close(slot, part);
    }
    // Closes started before (after a failure, a late start), each bounded as every close is.
    await Promise.all([...this.closing]);
    if (this.draining) await within(this.draining, this.timeoutMs).catch(() => undefined);
    this.options.log.info({ event: 'stopping', signal }, 'egressd stopping; the rules stay in force');
  }

  private async drain(): Promise<void> {
    try {
      while (this.pending) {
        const { why, waiters } = this.pending;
        this.pending = undefined;
        let outcome: ReloadOutcome;
        try {
          outcome = await this.applyOnce(why);
        } catch (error) {
          // applyOnce answers every failure of the apply itself; this is a bug past it. Its callers hear of it; the queue goes on.
          this.options.log.error({ event: 'reload-crashed', why, error: String(error) }, 'a reload failed unexpectedly; the running rules stay in force');
          outcome = { applied: false, code: 'EGD_INTERNAL', errors: [String(error)] };
        }
        for (const resolve of waiters) resolve(outcome);
      }
    } finally {
      this.draining = undefined;
    }
  }

  private async applyOnce(why: string): Promise<ReloadOutcome> {
    const { log, readiness } = this.options;
    if (this.phase === 'running') this.setPhase('reloading');
    readiness.applying(why);
    let applied: Applied;
    try {
      applied = await this.options.apply();
    } catch (error) {
      const code = isEgressError(error) ? error.code : 'EGD_INTERNAL';
      const errors = isEgressError(error) ? error.details : [String(error)];
      log.error({ event: 'apply-failed', why, code, errors }, `${(error as Error).message}; the running rules stay in force`);
      const tableInForce = await this.options.tableInForce().catch(() => false);
      if (this.stopping()) return { applied: false, code, errors };
      this.lastFailure = { code, errors };
      if (tableInForce) this.setPhase('running');
      readiness.failed(code, errors, tableInForce);
      await this.expireInForce();
      return { applied: false, code, errors };
    }
    log.info(
      {
        event: 'applied',
        why,
        digest: applied.digest,
        lockdown: applied.lockdown,
        warnings: applied.compiled.warnings.length,
        connectionsCut: applied.sweep.cut,
      },
      'policy applied',
    );
    await this.took(applied, false);
    return { applied: true, digest: applied.digest };
  }

  /** After a failed apply: an allow in force whose time is up still goes, by applying the policy in force again (it drops what expired). */
  private async expireInForce(): Promise<void> {
    const { log } = this.options;
    const now = (this.options.now ?? Date.now)();
    if (this.expiresAt === undefined || this.expiresAt > now || this.stopping()) return;
    const inForce = this.inForceNow;
    let applied: Applied | undefined;
    if (inForce && this.options.applyInForce) {
      try {
        applied = await this.options.applyInForce(inForce.policy);
      } catch (error) {
        log.error({ event: 'allow-expiry-apply-failed', error: describeError(error) }, 'an expired allow could not be taken out of the table; trying again');
      }
    }
    if (this.stopping()) return;
    if (!applied) {
      this.armExpiry(this.expiresAt, true);
      return;
    }
    log.warn(
      { event: 'allow-expired-in-force', digest: applied.digest, expired: applied.expired.map((e) => e.rule.id) },
      'the policy directory does not apply; the policy in force was applied again without the allows whose time is up',
    );
    await this.took(applied, true);
  }

  /** A successful apply: it is what is in force now; parts are told, the next expiry armed. `stillFailed`: the policy in force applied again, not the directory's. */
  private async took(applied: Applied, stillFailed: boolean): Promise<void> {
    const { readiness } = this.options;
    const inForce: InForce = { ...applied, liveNames: new Map([...applied.liveNames].map(([name, live]) => [name, [live]])) };
    this.inForceNow = inForce;
    this.applied = { digest: applied.digest, lockdown: applied.lockdown, rules: applied.compiled.ruleIds.length };
    if (!stillFailed) this.lastFailure = undefined;
    this.armExpiry(applied.nextExpiry);
    if (this.stopping()) return;
    if (!this.partsStarted) {
      this.partsStarted = true;
      await Promise.all(this.slots.filter((s) => s.state === 'waiting').map((s) => this.startPart(s)));
    } else await Promise.all(this.slots.map((s) => this.updatePart(s, inForce)));
    if (this.stopping()) return;
    this.setPhase('running');
    if (this.lastFailure) this.partsChanged();
    else readiness.enforcing(this.enforcing());
  }

  /** Applies again at `at` (looking at the clock at least every expiryCheckMs); `retry`: `at` has passed and the last try failed. */
  private armExpiry(at: number | undefined, retry = false): void {
    clearTimeout(this.expiryTimer);
    this.expiryTimer = undefined;
    this.expiresAt = at;
    if (at === undefined || this.stopping()) return;
    const now = this.options.now ?? Date.now;
    const longest = this.options.expiryCheckMs ?? 60_000;
    const wait = retry ? longest : Math.max(0, Math.min(at - now(), longest));
    this.expiryTimer = setTimeout(() => {
      this.expiryTimer = undefined;
      if (now() >= at) void this.reload('allowed entry expired');
      else this.armExpiry(at);
    }, wait);
    this.expiryTimer.unref();
  }

  private enforcing(): Parameters<typeof enforcingStatus>[0] {
    const a = this.applied!;
    return { digest: a.digest, rules: a.rules, lockdown: a.lockdown, parts: this.slots.map((s) => statusLine(this.report(s))) };
  }

  private async startPart(slot: Slot): Promise<void> {
    const inForce = this.inForceNow;
    if (!slot.spec || !inForce || this.stopping()) return;
    const generation = ++slot.generation;
    slot.state = 'starting';
    // A start that throws before it returns a promise (a part written without async) fails like one that rejects.
    const spec = slot.spec;
    const starting = Promise.resolve().then(() => spec.start(inForce, this.context(slot)));
    let part: Part;
    try {
      part = await within(starting, this.timeoutMs, `${slot.name} did not start within ${this.timeoutMs / 1000} s`);
    } catch (error) {
      // One that starts after all is closed at once: its slot has moved on.
      void starting.then(
        (late) => this.close(slot, late),
        () => undefined,
      );
      if (generation === slot.generation) this.partFailed(slot, 'start', error);
      return;
    }
    if (generation !== slot.generation || this.stopping()) {
      await this.close(slot, part);
      return;
    }
    slot.part = part;
    slot.state = 'running';
    slot.startedAt = Date.now();
    slot.lastError = undefined;
    this.options.log.info({ event: 'part-started', part: slot.name, restarts: slot.restarts }, `${slot.name} started`);
    const ended = (reason: unknown): void => {
      if (generation === slot.generation && !this.stopping()) this.partFailed(slot, 'stopped', reason ?? new Error('it stopped by itself'));
    };
    part.stopped.then(ended, ended);
    // An apply that ended while it started: it has the policy before that.
    if (this.inForceNow !== inForce) await this.updatePart(slot, this.inForceNow!);
    this.partsChanged();
  }

  private async updatePart(slot: Slot, inForce: InForce): Promise<void> {
    const part = slot.part;
    if (slot.state !== 'running' || !part) return;
    const generation = slot.generation;
    try {
      await within(part.update(inForce), this.timeoutMs, `${slot.name} did not take the new policy within ${this.timeoutMs / 1000} s`);
    } catch (error) {
      if (generation === slot.generation) this.partFailed(slot, 'update', error);
    }
  }

  private partFailed(slot: Slot, phase: 'start' | 'stopped' | 'update', error: unknown): void {
    if (this.stopping()) return;
    const part = slot.part;
    slot.part = undefined;
    slot.generation++;
    if (part) void this.close(slot, part);
    if (slot.state === 'running' && Date.now() - slot.startedAt >= this.backoff.healthyAfterMs) slot.failures = 0;
    slot.failures++;
    slot.state = phase === 'start' ? 'failed' : 'restarting';
    slot.lastError = oneLine(describeError(error));
    const delay = restartDelay(slot.failures, this.backoff, this.options.random);
    this.options.log.error(
      { event: 'part-failed', part: slot.name, phase, error: describeError(error), restarts: slot.restarts, retryInMs: delay },
      `${slot.name} ${phase === 'start' ? 'did not start' : phase === 'update' ? 'failed to take the new policy' : 'stopped'}; starting it again in ${delay} ms; enforcement goes on`,
    );
    clearTimeout(slot.timer);
    slot.timer = setTimeout(() => {
      slot.timer = undefined;
      slot.restarts++;
      void this.startPart(slot);
    }, delay);
    this.partsChanged();
  }

  private close(slot: Slot, part: Part): Promise<void> {
    const closing = (async () => {
      try {
        await within(part.close(), this.timeoutMs, `${slot.name} did not close within ${this.timeoutMs / 1000} s`);
      } catch (error) {
        this.options.log.warn({ event: 'part-close-failed', part: slot.name, error: describeError(error) }, `${slot.name}: closing failed`);
      }
    })();
    // stop() waits for these too: a part closed after a failure, or one that started late, still says its last words.
    this.closing.add(closing);
    void closing.finally(() => this.closing.delete(closing));
    return closing;
  }

  private context(slot: Slot): PartContext {
    const { nft, log, stateDir, policyDir } = this.options;
    return {
      nft,
      log: log.child({ part: slot.name }),
      stateDir,
      policyDir,
      reload: (why) => this.reload(why),
      status: () => this.status(),
      learnedNames: (address, uid) => this.learnedNames(address, uid),
    };
  }

  private report(slot: Slot): PartReport {
    const base = { name: slot.name, restarts: slot.restarts };
    switch (slot.state) {
      case 'running':
      case 'starting': {
        let detail: string | undefined;
        try {
          detail = slot.part?.describe?.();
        } catch {
          detail = undefined;
        }
        return { ...base, state: slot.state === 'starting' && slot.restarts > 0 ? 'restarting' : 'running', ...(detail === undefined ? {} : { detail }) };
      }
      case 'restarting':
      case 'failed':
        return { ...base, state: slot.state, ...(slot.lastError === undefined ? {} : { detail: slot.lastError }) };
      case 'waiting':
        return { ...base, state: 'off', detail: 'starts once a policy is applied' };
      case 'off':
        return { ...base, state: 'off', detail: 'off by configuration' };
    }
  }

  private partsFailing(): boolean {
    return this.slots.some((s) => s.state === 'restarting' || s.state === 'failed' || (s.state === 'starting' && s.restarts > 0));
  }

  /** A method, not a field compare: a stop can come during any await, which TypeScript's narrowing does not see. */
  private stopping(): boolean {
    return this.phase === 'stopping';
  }

  private setPhase(phase: Phase): void {
    this.phase = phase;
    this.partsChanged(false);
  }

  /** The state may have changed: log it, and tell systemd the parts' lines when nothing else is about to. */
  private partsChanged(tell = true): void {
    const state = this.state;
    if (state !== this.reported) {
      this.options.log.info({ event: 'state-changed', state, was: this.reported }, `egressd is ${state}`);
      this.reported = state;
    }
    if (!tell || this.phase !== 'running' || !this.applied) return;
    this.options.readiness.status(this.lastFailure ? failedStatus(this.lastFailure.code, this.lastFailure.errors, true) : enforcingStatus(this.enforcing()));
  }
}

/** A part's line in STATUS: what it says of itself, or why it does not run. */
export function statusLine(report: PartReport): string {
  const restarts = `${report.restarts} ${report.restarts === 1 ? 'restart' : 'restarts'}`;
  switch (report.state) {
    case 'running':
      return report.detail ?? `${report.name} running`;
    case 'restarting':
      return `${report.name} restarting (${restarts})`;
    case 'failed':
      return `${report.name} failed (${restarts})`;
    case 'off':
      return `${report.name} off`;
  }
}

function stoppingOutcome(): ReloadOutcome {
  return { applied: false, code: ErrorCode.Stopping, errors: ['egressd is stopping; the rules in force stay'] };
}

function within<T>(promise: Promise<T>, ms: number, message = 'timed out'): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(message)), ms)));
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export function describeError(error: unknown): string | readonly string[] {
  return isEgressError(error) && error.details.length > 0 ? [error.message, ...error.details] : error instanceof Error ? error.message : String(error);
}

function oneLine(described: string | readonly string[]): string {
  return typeof described === 'string' ? described : described.join('; ');
}
