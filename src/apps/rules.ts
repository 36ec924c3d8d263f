/**
 * What the app tracker does with a cgroup, worked out once per policy in
 * force: which identity map it joins with which verdict (the compiler's
 * `cgroupBindings`, claimed as the compiler claims: per map, the first
 * binding whose glob matches keeps the path), which directories must be
 * watched for new ones (those on the way to a glob's level, and only
 * those), and under which live names the compiled maps are in the table.
 * Pure: no I/O.
 */
import type { CgroupBinding, Compiled } from '../compile/compile.js';
import { cgroupGlobMatcher } from '../compile/glob.js';
import type { Verdict } from '../compile/ruleset.js';
import { withGeneration, type Generation } from '../enforce/swap.js';
import type { MapVerdict } from '../nft/set-elements.js';

/** One map a cgroup joins, with the verdict for a root-owned and for a delegated (non-root-owned) cgroup. */
export interface Claim {
  /** The compiled map's name. */
  readonly map: string;
  readonly owner: string;
  readonly verdict: Verdict;
  /** CgroupBinding.delegatedVerdict: for a cgroup a non-root uid owns. */
  readonly delegatedVerdict: Verdict;
  /** CgroupBinding.cutOff: present for an identity that denies. */
  readonly cutOff?: Verdict;
}

export interface CgroupRules {
  /** The deepest level any binding names: no cgroup deeper is ever looked at. */
  readonly maxLevel: number;
  /** The maps a cgroup at `path` ('a/b/c', as globs see it) joins; [] for none. */
  claimsFor(path: string): readonly Claim[];
  /** Whether a directory at `path` may hold (below it) a cgroup some binding matches: it is watched. */
  leadsToMatch(path: string): boolean;
}

export function cgroupRules(bindings: readonly CgroupBinding[]): CgroupRules {
  const compiled = bindings.map((binding) => {
    const segments = binding.glob.split('/');
    // A matcher per depth on the way down: the glob's first k segments.
    const prefixes = segments.slice(0, -1).map((_, k) => cgroupGlobMatcher(segments.slice(0, k + 1).join('/')));
    return { binding, matches: cgroupGlobMatcher(binding.glob), prefixes };
  });
  const maxLevel = Math.max(0, ...bindings.map((b) => b.level));
  return {
    maxLevel,
    claimsFor(path) {
      const depth = depthOf(path);
      const claims: Claim[] = [];
      const taken = new Set<string>();
      for (const { binding, matches } of compiled) {
        if (binding.level !== depth || taken.has(binding.map) || !matches(path)) continue;
        taken.add(binding.map);
        claims.push({
          map: binding.map,
          owner: binding.owner,
          verdict: binding.verdict,
          delegatedVerdict: binding.delegatedVerdict,
          ...(binding.cutOff === undefined ? {} : { cutOff: binding.cutOff }),
        });
      }
      return claims;
    },
    leadsToMatch(path) {
      if (path === '') return bindings.length > 0;
      const depth = depthOf(path);
      return compiled.some(({ binding, prefixes }) => binding.level > depth && prefixes[depth - 1]!(path));
    },
  };
}

function depthOf(path: string): number {
  return path === '' ? 0 : path.split('/').length;
}

/** A compiled map as it is in the table: its live name, and its chains' generation (verdicts name generation chains). */
export interface LiveMap {
  readonly live: string;
  readonly generation: Generation;
}

/**
 * Each cgroup map of `compiled` → the live maps that are exactly it. As the
 * resolver finds its sets (dnsSetsInForce): by the name its contents give
 * it in either generation, never by its base name alone — `app_cg_l2` of a
 * table applied from another policy may send to another app's chain.
 * `given`, when known (an apply just told it), is checked the same way.
 */
export function cgroupMapsInForce(
  compiled: Compiled,
  liveSets: ReadonlySet<string> | undefined,
  given?: ReadonlyMap<string, readonly string[]>,
): Map<string, LiveMap[]> {
  // Every cgroup map, also one no selector fills: compile makes a level's map for cut-off ancestors alone, and the tracker cuts off there too.
  const wanted = new Set([...compiled.cgroupBindings.map((b) => b.map), ...compiled.ruleset.sets.filter((s) => typeof s.key === 'object').map((s) => s.name)]);
  // Verdict maps are named for their generation too (withGeneration): a name says which chains its elements go to.
  const byGeneration = (['a', 'b'] as const).map((generation) => ({ generation, sets: withGeneration(compiled.ruleset, generation).sets }));
  const found = new Map<string, LiveMap[]>();
  compiled.ruleset.sets.forEach((set, i) => {
    if (!wanted.has(set.name)) return;
    const live: LiveMap[] = [];
    for (const { generation, sets } of byGeneration) {
      const name = sets[i]!.name;
      const present = given ? (given.get(set.name) ?? []).includes(name) : liveSets?.has(name) === true;
      if (present) live.push({ live: name, generation });
    }
    if (live.length > 0) found.set(set.name, live);
  });
  return found;
}

/** A compiled verdict as a live map element says it: a chain by its name in `generation`. */
export function liveVerdict(verdict: Verdict, generation: Generation, chains: ReadonlySet<string>): MapVerdict {
  const chain = (target: string): string => (chains.has(target) ? `${target}.${generation}` : target);
  if ('accept' in verdict) return { kind: 'accept' };
  if ('drop' in verdict) return { kind: 'drop' };
  if ('return' in verdict) return { kind: 'return' };
  if ('jump' in verdict) return { kind: 'jump', chain: chain(verdict.jump.target) };
  return { kind: 'goto', chain: chain(verdict.goto.target) };
}

/** A map verdict as one comparable string. */
export function verdictKey(verdict: MapVerdict): string {
  return 'chain' in verdict ? `${verdict.kind} ${verdict.chain}` : verdict.kind;
}
