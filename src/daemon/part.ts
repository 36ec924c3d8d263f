/**
 * The seam between egressd and what runs beside enforcement: the resolver,
 * the app tracker, the denial reader and store, the D-Bus service, Tor's
 * status. Each is a `PartSpec` the daemon starts once a table is enforced,
 * tells about every later apply, restarts with back-off when it stops by
 * itself, and closes when egressd stops. A part never stops enforcement: the
 * kernel holds the rules whether or not any part runs.
 */
import type { Logger } from 'pino';
import type { Nft } from '../nft/client.js';
import type { NameFor } from '../resolver/memory.js';
import type { InForce } from '../resolver/runtime.js';

/** What a reload asked of the daemon came to. */
export type ReloadOutcome =
  { readonly applied: true; readonly digest: string } | { readonly applied: false; readonly code: string; readonly errors: readonly string[] };

/** The daemon's state, as `status` and the D-Bus service tell it. */
export type DaemonState = 'starting' | 'enforcing' | 'reloading' | 'degraded' | 'stopping';

export interface PartReport {
  readonly name: string;
  readonly state: 'running' | 'restarting' | 'failed' | 'off';
  /** One line a person reads ("resolver on 127.0.0.153, ::1", "updates: over Tor (bootstrapped 100 %)"). */
  readonly detail?: string;
  readonly restarts: number;
}

export interface DaemonStatus {
  readonly state: DaemonState;
  /** sha256 of the policy in force; undefined before the first apply. */
  readonly digest: string | undefined;
  readonly lockdown: boolean;
  readonly parts: readonly PartReport[];
}

export interface PartContext {
  readonly nft: Nft;
  /** A child of the daemon's logger, with `part` set. */
  readonly log: Logger;
  readonly stateDir: string;
  /** The policy directory (a part that writes a drop-in there, such as allow-from-alert, then calls reload). */
  readonly policyDir: string;
  /** Re-validate and re-apply the policy, queued behind any apply in progress. */
  reload(why: string): Promise<ReloadOutcome>;
  status(): DaemonStatus;
  /** Names an address was learned from, for a denial of `uid`'s: those it asked for first, then by latest expiry (the resolver's memory); [] when no resolver runs. */
  learnedNames(address: string, uid: number | undefined): readonly NameFor[];
}

export interface Part {
  /** A new policy is in force (after every successful apply but the one the part started with). */
  update(inForce: InForce): Promise<void>;
  /** egressd is stopping; the rules stay. */
  close(): Promise<void>;
  /** Settles when the part stops by itself (a crash, a lost connection): the daemon reports it and starts it again with back-off. */
  readonly stopped: Promise<unknown>;
  /** One line for `status`, STATUS= and the D-Bus Status. */
  describe?(): string;
  /** The part that remembers which names addresses were learned from (the resolver) answers `PartContext.learnedNames` through this. */
  learnedNames?(address: string, uid: number | undefined): readonly NameFor[];
}

export interface PartSpec {
  readonly name: string;
  start(inForce: InForce, context: PartContext): Promise<Part>;
}
