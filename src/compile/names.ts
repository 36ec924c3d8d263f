import type { Policy } from '../policy/model.js';
import type { NameTable } from '../policy/name-table.js';
import type { DnsBinding } from './compile.js';

/**
 * Which name rules a DNS name falls under. Built once per policy (the hot
 * path, one lookup per DNS answer, is a handful of reads: the name itself,
 * then each parent for suffix rules). A list's names are read in the list's
 * own NameTable, never copied: a 143,876-name list adds no entry here.
 */
export interface NameIndex {
  /** Indices into `bindings` of every rule whose names cover `name`, in binding order. */
  lookup(name: string): readonly number[];
  /**
   * Whether the policy spells `name` out: a rule's or a list's exact name,
   * or a suffix's own apex (`*.example.org` spells example.org). Every other
   * name a rule covers lies strictly below a suffix, its labels chosen by
   * whoever asks.
   */
  spelledOut(name: string): boolean;
  readonly bindings: readonly DnsBinding[];
  /** Exact names and suffixes indexed: the rules' own (distinct) and every list's (counted per list). */
  readonly size: { readonly names: number; readonly suffixes: number };
}

const NONE: readonly number[] = Object.freeze([]);

/** One list used by rules with names: its tables and the bindings it feeds. */
interface ListEntry {
  readonly names: NameTable;
  readonly suffixes: NameTable;
  readonly ids: readonly number[];
}

export function buildNameIndex(policy: Policy, bindings: readonly DnsBinding[]): NameIndex {
  const exact = new Map<string, number[]>();
  const suffix = new Map<string, number[]>();
  const add = (map: Map<string, number[]>, key: string, id: number): void => {
    const current = map.get(key);
    if (!current) map.set(key, [id]);
    else if (!current.includes(id)) current.push(id);
  };
  const listBindings = new Map<string, number[]>();
  bindings.forEach((binding, index) => {
    for (const name of binding.names) add(exact, name, index);
    for (const s of binding.suffixes) add(suffix, s, index);
    for (const list of binding.lists) {
      const ids = listBindings.get(list) ?? [];
      ids.push(index);
      listBindings.set(list, ids);
    }
  });
  const lists: ListEntry[] = [];
  for (const [listName, ids] of listBindings) {
    const list = policy.lists.get(listName);
    if (list) lists.push({ names: list.names, suffixes: list.suffixes, ids });
  }
  const listedNames = lists.reduce((n, l) => n + l.names.size, 0);
  const listedSuffixes = lists.reduce((n, l) => n + l.suffixes.size, 0);
  const anySuffix = suffix.size + listedSuffixes > 0;

  const keyOf = (name: string): string => name.toLowerCase().replace(/\.$/, '');

  return {
    bindings,
    size: { names: exact.size + listedNames, suffixes: suffix.size + listedSuffixes },
    spelledOut(name: string): boolean {
      const key = keyOf(name);
      return exact.has(key) || suffix.has(key) || lists.some((list) => list.names.has(key) || list.suffixes.has(key));
    },
    lookup(name: string): readonly number[] {
      const key = keyOf(name);
      let result: number[] | undefined;
      const take = (ids: readonly number[]): void => {
        if (!result) result = [...ids];
        else for (const id of ids) if (!result.includes(id)) result.push(id);
      };
      const found = exact.get(key);
      if (found) take(found);
      for (const list of lists) if (list.names.has(key)) take(list.ids);
      // "*.example.org" covers example.org and every name below it.
      if (anySuffix) {
        for (let at = 0; at >= 0; at = key.indexOf('.', at) + 1 || -1) {
          const ids = suffix.size > 0 ? suffix.get(at === 0 ? key : key.slice(at)) : undefined;
          if (ids) take(ids);
          for (const list of lists) if (list.suffixes.has(key, at)) take(list.ids);
        }
      }
      return result ? result.sort((a, b) => a - b) : NONE;
    },
  };
}
