/**
 * Re-applies when what the policy's users and groups resolve to changes.
 *
 * The table holds ids, not names: a system domain's member user created
 * after an apply would keep its network until the next one. So the daemon
 * watches the account files (`accountFilesToWatch`) and, when one changes,
 * reads the facts the policy in force needs again; only if they differ from
 * those it was compiled against does it ask for a re-apply. An edit that
 * touches nothing the policy names (another user added, a password changed)
 * re-applies nothing.
 */
import { factsNeeded, type Facts, type FactsNeeded } from '../compile/compile.js';
import type { Policy } from '../policy/model.js';
import { watchFiles, type FileWatch, type WatchFilesOptions } from '../system/watch-files.js';

export interface AccountsWatchDeps {
  readonly files: readonly string[];
  /** The policy in force and the facts it was compiled against; undefined before the first apply. */
  readonly inForce: () => { readonly policy: Policy; readonly facts: Facts } | undefined;
  readonly gather: (needed: FactsNeeded) => Facts;
  /** The facts changed: re-apply. */
  readonly changed: (files: readonly string[]) => void;
  /** A file changed but nothing the policy uses did: nothing to do (said, so a person sees the change was looked at). */
  readonly unchanged?: (files: readonly string[]) => void;
  /** The facts could not be read again (the next change tries again). */
  readonly failed?: (error: unknown) => void;
  readonly watch?: WatchFilesOptions;
}

export function watchAccounts(deps: AccountsWatchDeps): FileWatch {
  return watchFiles(
    deps.files,
    (files) => {
      const current = deps.inForce();
      if (current === undefined) return;
      let now: Facts;
      try {
        // Cgroups are not what these files change, and walking them costs: left out of both sides of the comparison.
        now = deps.gather({ ...factsNeeded(current.policy), cgroupDepth: 0 });
      } catch (error) {
        deps.failed?.(error);
        return;
      }
      if (accountFactsDiffer(current.facts, now)) deps.changed(files);
      else deps.unchanged?.(files);
    },
    deps.watch,
  );
}

/** Whether two sets of facts say different things of users and groups: ids, subordinate ranges, members, and whether members may be missing. */
export function accountFactsDiffer(a: Facts, b: Facts): boolean {
  return accountKey(a) !== accountKey(b);
}

function accountKey(facts: Facts): string {
  return JSON.stringify([
    sorted(facts.users),
    sorted(facts.groups),
    sorted(facts.subordinate ?? new Map()),
    sorted(facts.members ?? new Map()),
    facts.membersIncomplete ?? null,
  ]);
}

function sorted<K extends string | number, V>(map: ReadonlyMap<K, V>): [K, V][] {
  return [...map].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}
