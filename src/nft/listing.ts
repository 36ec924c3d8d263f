/**
 * Typed walkers over what nft lists: which chains a rule or a verdict map
 * sends packets to, and which sets and maps it looks up. They walk the
 * parsed statements by their shape (`{"jump": {"target": …}}`, `"@name"`),
 * wherever nft nests them (a match's right side, a vmap's data, an inline
 * anonymous map), so a reference is never missed for a layout egressd does
 * not write itself (a rule added by hand); and a set's listed elements,
 * flattened into key, verdict and options.
 */
import type { Verdict } from '../compile/ruleset.js';
import type { NftElementInfo, NftElemJson, NftJson, NftListedElem, NftRuleInfo, NftSetInfo } from './types.js';

/** What statements or elements refer to: chains by jump/goto, sets and maps by `@name`. */
export interface References {
  readonly chains: string[];
  readonly sets: string[];
}

function walk(value: NftJson | readonly NftJson[] | undefined, into: References): void {
  if (typeof value === 'string') {
    if (value.startsWith('@')) into.sets.push(value.slice(1));
    return;
  }
  if (value === null || typeof value !== 'object') return;
  if (Array.isArray(value)) {
    for (const item of value as readonly NftJson[]) walk(item, into);
    return;
  }
  for (const [key, inner] of Object.entries(value as { [key: string]: NftJson })) {
    // Text, not expressions: a log prefix or comment that starts with "@" names no set.
    if (key === 'log' || key === 'comment') continue;
    if ((key === 'jump' || key === 'goto') && inner !== null && typeof inner === 'object' && !Array.isArray(inner) && typeof inner['target'] === 'string') {
      into.chains.push(inner['target']);
    } else {
      walk(inner, into);
    }
  }
}

/** The chains a rule jumps or goes to and the sets and maps it looks up, in order. */
export function ruleReferences(rule: Pick<NftRuleInfo, 'expr'>): References {
  const found: References = { chains: [], sets: [] };
  walk(rule.expr, found);
  return found;
}

/** The chains a verdict map's elements jump or go to (and any set an element names). */
export function elementReferences(set: Pick<NftSetInfo, 'elem'>): References {
  const found: References = { chains: [], sets: [] };
  walk(set.elem as readonly NftJson[] | undefined, found);
  return found;
}

/** Flattens the `elem` list of a listed set or map into key/data/timeout/expires. */
export function elementsOf(set: { readonly elem?: readonly NftElemJson[] }): NftElementInfo[] {
  return (set.elem ?? []).map((item): NftElementInfo => {
    if (Array.isArray(item)) {
      const [key, data] = item as readonly [NftListedElem, Verdict];
      return { ...unwrap(key), data };
    }
    return unwrap(item as NftListedElem);
  });
}

function unwrap(item: NftListedElem): NftElementInfo {
  if (typeof item === 'object' && 'elem' in item) {
    const e = item.elem;
    return {
      key: e.val,
      ...(e.timeout === undefined ? {} : { timeout: e.timeout }),
      ...(e.expires === undefined ? {} : { expires: e.expires }),
      ...(e.comment === undefined ? {} : { comment: e.comment }),
    };
  }
  return { key: item };
}
