/**
 * Tor's status as a part of the daemon: the one updates line ("updates: over
 * Tor (bootstrapped 100 %)", "updates: blocked — Tor not running",
 * "updates: direct (updates over Tor off)") in STATUS, `status()` and the
 * D-Bus Status, kept current by asking Tor's control port every
 * `intervalMs` while updates over Tor are on (nothing is asked while off).
 * Whether the switch is on comes from the policy in force, the same source
 * as the table's confinement.
 */
import type { Part, PartSpec } from '../daemon/part.js';
import type { InForce } from '../resolver/runtime.js';
import { torSwitchStatus } from './switch-status.js';
import { updatesLine } from './status.js';

export interface TorStatusPartOptions {
  /** Default 30 s. */
  readonly intervalMs?: number;
  /** Where Tor's configuration is read ("/" on the machine itself). */
  readonly root?: string;
}

export function torStatusPart(options: TorStatusPartOptions = {}): PartSpec {
  return {
    name: 'tor',
    start(first, context): Promise<Part> {
      let on = first.policy.tor.enabled;
      let line = updatesLine(on, undefined);
      let closed = false;
      let asking: Promise<void> | undefined;
      const ask = (): Promise<void> =>
        (asking ??= (async () => {
          try {
            const status = await torSwitchStatus({ root: options.root ?? '/', stateDir: context.stateDir, liveTorUpdates: on });
            if (!closed) line = status.line;
          } catch (error) {
            context.log.warn({ event: 'tor-status-failed', error: (error as Error).message }, "could not read Tor's status");
          } finally {
            asking = undefined;
          }
        })());
      void ask();
      const timer = setInterval(() => {
        if (on) void ask();
      }, options.intervalMs ?? 30_000);
      timer.unref();
      return Promise.resolve({
        stopped: new Promise<never>(() => undefined),
        update(inForce: InForce) {
          on = inForce.policy.tor.enabled;
          line = updatesLine(on, undefined);
          void ask();
          return Promise.resolve();
        },
        describe: () => line,
        close() {
          closed = true;
          clearInterval(timer);
          return Promise.resolve();
        },
      });
    },
  };
}
