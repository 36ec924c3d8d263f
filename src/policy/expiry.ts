/**
 * Time-limited allows (`allowed:` entries with `until`) at a given moment.
 * Loading and compiling never read the clock, so a policy means the same
 * whenever it is checked; apply, plan and explain pass the clock in here, and
 * an entry whose time is up is left out before anything is compiled. So an
 * expired allow never reaches the table, whether or not anything has removed
 * it from its file yet (the D-Bus part's pruning of 80-allowed.yaml is only
 * tidying).
 */
import type { PolicyIssue } from './issues.js';
import type { Policy, Rule } from './model.js';

export interface ExpiredAllow {
  readonly app: string;
  readonly rule: Rule;
  /** The entry's `until`, ms since the epoch. */
  readonly until: number;
}

export interface PolicyAt {
  /** The policy without the entries whose `until` is at or before the moment asked about. */
  readonly policy: Policy;
  readonly expired: readonly ExpiredAllow[];
  /** The earliest `until` still ahead, ms since the epoch: when the policy in force changes by itself. */
  readonly nextExpiry: number | undefined;
}

/** The policy as it holds at `now` (pure: the clock is the caller's). */
export function policyAt(policy: Policy, now: number): PolicyAt {
  const expired: ExpiredAllow[] = [];
  let nextExpiry: number | undefined;
  const apps = policy.apps.map((app) => {
    const kept = app.rules.filter((rule) => {
      if (rule.until === undefined) return true;
      if (rule.until <= now) {
        expired.push({ app: app.name, rule, until: rule.until });
        return false;
      }
      nextExpiry = nextExpiry === undefined ? rule.until : Math.min(nextExpiry, rule.until);
      return true;
    });
    if (kept.length === app.rules.length) return app;
    return { ...app, rules: kept };
  });
  return { policy: expired.length > 0 ? { ...policy, apps } : policy, expired, nextExpiry };
}

/** What plan, explain and check say of an expired entry: at its line, as a warning (it is valid, just no longer in force). */
export function expiredIssues(expired: readonly ExpiredAllow[]): PolicyIssue[] {
  return expired.map((e) => ({
    severity: 'warning',
    at: e.rule.at,
    message: `allowed entry for app "${e.app}" expired at ${new Date(e.until).toISOString()}; it is not applied (${e.rule.id})`,
    hint: 'egressd removes it from the file; delete it, or renew it with egressctl allow',
  }));
}
