import type { SetSummary, TableSummary } from './summary.js';

export interface RuleChange {
  readonly chain: string;
  readonly id: string;
  readonly comment: string;
}

export interface SetChange {
  readonly name: string;
  readonly change: 'added' | 'removed' | 'changed' | 'same';
  readonly compiled: number | undefined;
  readonly live: number | undefined;
  readonly dynamic: boolean;
}

export interface Plan {
  /** True when applying would change the live table (a dynamic set's contents alone do not count). */
  readonly changes: boolean;
  readonly tablePresent: boolean;
  readonly digest: { readonly compiled: string | undefined; readonly live: string | undefined };
  readonly lockdown: { readonly compiled: boolean; readonly live: boolean };
  readonly added: readonly RuleChange[];
  readonly removed: readonly RuleChange[];
  readonly sets: readonly SetChange[];
}

/**
 * What applying `compiled` would change in `live` (null: no table). Rules
 * are compared by comment — file:line, rule id and a fingerprint of the
 * compiled rule — as a multiset per chain.
 */
export function planChanges(compiled: TableSummary, live: TableSummary | null): Plan {
  const added: RuleChange[] = [];
  const removed: RuleChange[] = [];
  const chainNames = [...new Set([...compiled.chains.keys(), ...(live?.chains.keys() ?? [])])];
  for (const chain of chainNames) {
    const want = [...(compiled.chains.get(chain) ?? [])];
    const have = [...(live?.chains.get(chain) ?? [])];
    for (const rule of want) {
      const at = have.findIndex((h) => h.comment === rule.comment);
      if (at >= 0) have.splice(at, 1);
      else added.push({ chain, id: rule.id, comment: rule.comment });
    }
    for (const rule of have) removed.push({ chain, id: rule.id, comment: rule.comment });
  }

  const sets: SetChange[] = [];
  const setNames = [...new Set([...compiled.sets.keys(), ...(live?.sets.keys() ?? [])])].sort();
  for (const name of setNames) {
    const want: SetSummary | undefined = compiled.sets.get(name);
    const have: SetSummary | undefined = live?.sets.get(name);
    const dynamic = (want ?? have)!.dynamic;
    let change: SetChange['change'];
    if (!have) change = 'added';
    else if (!want) change = 'removed';
    else if (want.kind !== have.kind || (!dynamic && want.contents !== have.contents)) change = 'changed';
    else change = 'same';
    sets.push({ name, change, compiled: want?.size, live: have?.size, dynamic });
  }

  const changes = live === null || added.length > 0 || removed.length > 0 || sets.some((s) => s.change !== 'same') || compiled.lockdown !== live.lockdown;
  return {
    changes,
    tablePresent: live !== null,
    digest: { compiled: compiled.digest, live: live?.digest },
    lockdown: { compiled: compiled.lockdown, live: live?.lockdown ?? false },
    added,
    removed,
    sets,
  };
}
