import type { Policy } from '../policy/model.js';
import type { DnsBinding } from './compile.js';

/**
 * Which name rules a DNS name falls under. Built once per policy (the hot
 * path, one lookup per DNS answer, is a handful of Map reads: the name
 * itself, then each parent for suffix rules).
 */
export interface NameIndex {
  /** Indices into `bindings` of every rule whose names cover `name`, in binding order. */
  lookup(name: string): readonly number[];
  readonly bindings: readonly DnsBinding[];
  /** Distinct exact names and suffixes indexed. */
  readonly size: { readonly names: number; readonly suffixes: number };
}

const NONE: readonly number[] = Object.freeze([]);

export function buildNameIndex(policy: Policy, bindings: readonly DnsBinding[]): NameIndex {
  const exact = new Map<string, number[]>();
  const suffix = new Map<string, number[]>();
  // Names of one list share one array until a second binding needs a copy, so
  // a 143,876-name list costs one Map entry per name and no more.
  const add = (map: Map<string, number[]>, key: string, ids: number[]): void => {
    const current = map.get(key);
    if (!current) map.set(key, ids);
    else if (current !== ids)
      map.set(
        key,
        [...new Set([...current, ...ids])].sort((a, b) => a - b),
      );
  };
  const listBindings = new Map<string, number[]>();
  bindings.forEach((binding, index) => {
    for (const name of binding.names) add(exact, name, [index]);
    for (const s of binding.suffixes) add(suffix, s, [index]);
    for (const list of binding.lists) {
      const ids = listBindings.get(list) ?? [];
      ids.push(index);
      listBindings.set(list, ids);
    }
  });
  for (const [listName, ids] of listBindings) {
    const list = policy.lists.get(listName);
    if (!list) continue;
    for (const name of list.names) add(exact, name, ids);
    for (const s of list.suffixes) add(suffix, s, ids);
  }

  return {
    bindings,
    size: { names: exact.size, suffixes: suffix.size },
    lookup(name: string): readonly number[] {
      const key = name.toLowerCase().replace(/\.$/, '');
      const found = exact.get(key);
      let result: number[] | undefined = found ? [...found] : undefined;
      // "*.example.org" covers example.org and every name below it.
      for (let at = 0; at >= 0; at = key.indexOf('.', at) + 1 || -1) {
        const ids = suffix.get(key.slice(at));
        if (ids) result = result ? [...new Set([...result, ...ids])] : [...ids];
        if (at === 0 && key.indexOf('.') < 0) break;
      }
      return result ? result.sort((a, b) => a - b) : NONE;
    },
  };
}
