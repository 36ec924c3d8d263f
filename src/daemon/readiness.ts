/**
 * What egressd tells systemd, and when: READY=1 only once a table is
 * enforced, RELOADING=1 … READY=1 around every re-apply, STOPPING=1, and a
 * STATUS line a person reads in `systemctl status`. The texts are built
 * here (pure, tested); the daemon calls one method at each point of its life.
 */
import { ErrorCode } from '../errors.js';
import type { ListenAddress } from '../resolver/server.js';
import { monotonicUsec, type Notifier, type NotifyFields } from '../system/sd-notify.js';

/** What was applied, as far as the STATUS line tells it. */
export interface Enforcing {
  readonly digest: string;
  readonly rules: number;
  readonly lockdown: boolean;
  /** Where the resolver answers; undefined when it is not running. Said when `parts` is not given. */
  readonly resolver?: readonly ListenAddress[] | undefined;
  /** Each part's line (its own description, or why it does not run), in the daemon's order: said instead of the resolver's alone. */
  readonly parts?: readonly string[];
}

export function enforcingStatus(e: Enforcing): string {
  const policy = `${e.lockdown ? 'lockdown, ' : ''}enforcing policy sha256:${e.digest.slice(0, 12)}… (${e.rules} ${e.rules === 1 ? 'rule' : 'rules'})`;
  if (e.parts) return [policy, ...e.parts].join(', ');
  const addresses = [...new Set(e.resolver?.map((a) => a.address))];
  return `${policy}, ${addresses.length > 0 ? `resolver on ${addresses.join(', ')}` : 'resolver not running'}`;
}

export function reloadingStatus(why: string): string {
  return `re-applying: ${why}`;
}

/**
 * `code` and `errors` as the apply-failed log line carries them. A broken
 * policy's errors are all said, each with its file:line:col, so `systemctl
 * status` shows what to fix; past STATUS_ERRORS_MAX characters the rest are
 * counted and left to the log.
 */
export function failedStatus(code: string, errors: readonly string[], tableInForce: boolean): string {
  const n = errors.length;
  const what =
    code === ErrorCode.PolicyInvalid
      ? `${n} ${n === 1 ? 'error' : 'errors'} in the policy${n === 0 ? '' : ` (${listed(errors)})`}`
      : `${code}${errors[0] === undefined ? '' : ` (${errors[0]})`}`;
  return `apply failed: ${what}; ${tableInForce ? 'previous table stays in force' : 'no egressd table in force'}`;
}

/** STATUS is one line systemd keeps whole; a policy with hundreds of errors is told in the log. */
export const STATUS_ERRORS_MAX = 2000;

function listed(errors: readonly string[]): string {
  let text = '';
  for (const [i, error] of errors.entries()) {
    const one = error.replace(/\s*\n\s*/g, ' ');
    if (text.length + one.length > STATUS_ERRORS_MAX && i > 0) return `${text}; … ${errors.length - i} more in the log`;
    text += `${i === 0 ? '' : '; '}${one}`;
  }
  return text;
}

export function stoppingStatus(signal: string): string {
  return `stopping (${signal}); the rules stay in force`;
}

export interface Readiness {
  /** An apply is about to run; `why` says what asked for it. The first apply (start) sends nothing. */
  applying(why: string): void;
  /** The apply succeeded and this is in force. */
  enforcing(e: Enforcing): void;
  /** The apply failed; `tableInForce` says whether a table from before still holds (at start, none means no READY). */
  failed(code: string, errors: readonly string[], tableInForce: boolean): void;
  stopping(signal: string): void;
  /** What holds changed between applies (a part stopped or came back): a new STATUS line, once READY was said. */
  status(text: string): void;
}

export function readiness(notifier: Notifier, now: () => bigint = monotonicUsec): Readiness {
  let ready = false;
  let stopped = false;
  const send = (fields: NotifyFields): void => notifier.send(fields);
  return {
    applying(why) {
      // Before the first READY systemd's state is "activating"; RELOADING=1 then would be a lie.
      if (ready) send({ reloading: true, monotonicUsec: now(), status: reloadingStatus(why) });
    },
    enforcing(e) {
      ready = true;
      send({ ready: true, status: enforcingStatus(e) });
    },
    failed(code, errors, tableInForce) {
      // A failed re-apply must still end the reload (READY=1), or systemd waits for it until its timeout; a failed start with no table is no readiness.
      if (ready || tableInForce) {
        ready = true;
        send({ ready: true, status: failedStatus(code, errors, tableInForce) });
      } else send({ status: failedStatus(code, errors, tableInForce) });
    },
    stopping(signal) {
      stopped = true;
      send({ stopping: true, status: stoppingStatus(signal) });
    },
    status(text) {
      if (ready && !stopped) send({ status: text });
    },
  };
}
