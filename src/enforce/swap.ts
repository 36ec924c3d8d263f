/**
 * Replacing the live table without a window, in three transactions.
 *
 * Measured here (bench/replace-drops.ts and the e2e leak test): replacing the
 * table by `add table; delete table; table {…}` in ONE transaction lets a few
 * packets through that the old and the new policy both deny (119 of 60,386
 * denied datagrams during 300 replaces, default allow + a global deny set),
 * and drops a few that both allow (3–5 SYNs per 300 replaces, default deny +
 * an app map): for an instant a set lookup misses, and the chain's default
 * decides. Tables without set lookups lose nothing.
 *
 * So the rules never switch to sets in the transaction that creates them, and
 * maps are never deleted in the transaction that stops using them (deleting
 * a verdict map deactivates its elements at that commit, under packets still
 * in the old rules):
 *   1. prepare — the new generation's sets, maps and chains are added under
 *      fresh names ("global_deny.b"), unused;
 *   2. switch — the base chain's rules are replaced to use them; a packet
 *      still in the old rules finds the old sets and maps whole;
 *   3. clean-up — the previous generation, now unreferenced, is removed.
 * A crash between any two leaves unused objects, which the next apply
 * removes first.
 *
 * Chains are named by generation ("app_x.a"); sets and maps by their
 * contents ("global_deny_net4.3f9c…": a digest of the declaration and
 * elements, and for DNS sets of the names that fill them). A set whose
 * contents did not change is not written again — re-applying a policy whose
 * 100,000-CIDR list is unchanged costs no element — and a DNS set keeps the
 * addresses the resolver put in it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { TABLE } from '../compile/compile.js';
import {
  command,
  renderText,
  type ChainDecl,
  type Command,
  type Element,
  type Ruleset,
  type SetDecl,
  type Statement,
  type Verdict,
} from '../compile/ruleset.js';
import { elementReferences, ruleReferences } from '../nft/listing.js';
import type { NftTableListing, NftTableNames } from '../nft/types.js';

export type Generation = 'a' | 'b';

/** A live name taken apart: a chain's `NAME.generation`, a set's `NAME.digest`, or a name without either (the base chain). */
export type LiveName = { readonly base: string; readonly generation?: Generation; readonly digest?: string };

const DIGEST_LENGTH = 16;
const DIGEST = new RegExp(`^[0-9a-f]{${DIGEST_LENGTH}}$`);
const isDigest = (text: string) => DIGEST.test(text);

/** Parses what withGeneration (below) and the apply marker name; compiled names never contain a dot. */
export function parseLiveName(name: string): LiveName {
  const dot = name.lastIndexOf('.');
  if (dot < 0) return { base: name };
  const suffix = name.slice(dot + 1);
  const base = name.slice(0, dot);
  if (suffix === 'a' || suffix === 'b') return { base, generation: suffix };
  return isDigest(suffix) ? { base, digest: suffix } : { base: name };
}

/** A live chain or set name without its generation or contents digest. */
export function baseName(name: string): string {
  return parseLiveName(name).base;
}

/**
 * `NAME.digest`: the same declaration, elements and source always get the
 * same name. The comment (the rule's file:line) is left out: a line added
 * above a rule must not rewrite its 100,000 CIDRs or empty its DNS sets, so a
 * kept set may show its rule's former line. `salt` gives a set that must not
 * take its usual name (one changed by hand, see withGeneration) another one.
 */
function contentName(set: SetDecl, salt = ''): string {
  const { comment: _comment, ...declared } = set;
  const declaration = renderText({ table: TABLE, sets: [declared], chains: [] });
  return `${set.name}.${createHash('sha256')
    .update(declaration)
    .update(`\0${set.source ?? ''}\0${salt}`)
    .digest('hex')
    .slice(0, DIGEST_LENGTH)}`;
}

/**
 * The names a compiled set can have in the table: the one its contents give
 * it, or that name salted with a generation (withGeneration's `avoid`).
 * A set of another name is another set — for the resolver, another rule's,
 * whatever its base name says — and is never written as this one.
 */
export function liveSetNames(set: SetDecl): readonly string[] {
  return [contentName(set), contentName(set, 'a'), contentName(set, 'b')];
}

/**
 * Each apply adds an empty chain named `applied_<random>.<generation>` with
 * its generation: the table's names then say which apply left it, so that
 * names alone (cheap to list) can tell whether the table is still exactly as
 * the apply recorded in the state directory left it.
 */
const APPLY_MARKER = /^applied_[0-9a-f]{16}$/;

export function isApplyMarker(name: string): boolean {
  const { base, digest } = parseLiveName(name);
  return digest === undefined && APPLY_MARKER.test(base);
}

export function newApplyMarker(): string {
  return `applied_${randomBytes(8).toString('hex')}`;
}

/** Every chain, set and map of a table, one "kind name" string each, sorted: the form names are compared in. */
export function nameList(names: NftTableNames): string[] {
  return [...names.chains.map((c) => `chain ${c.name}`), ...names.sets.map((x) => `set ${x.name}`), ...names.maps.map((m) => `map ${m.name}`)].sort();
}

/** The names a table holds once `live` (a ruleset withGeneration renamed) is switched in with its marker, and the other generation is gone. */
export function namesAfterSwap(live: Ruleset, marker: string): string[] {
  return [...live.chains.map((c) => `chain ${c.name}`), `chain ${marker}`, ...live.sets.map((x) => `${x.map ? 'map' : 'set'} ${x.name}`)].sort();
}

/** The generation the live base chain uses, if any: the one its jump to the global deny chain names. */
export function liveGeneration(listing: NftTableListing | null): Generation | undefined {
  if (!listing) return undefined;
  const base = new Set(listing.chains.filter((c) => c.hook !== undefined).map((c) => c.name));
  for (const r of listing.rules) {
    if (!base.has(r.chain)) continue;
    for (const target of ruleReferences(r).chains) {
      const name = parseLiveName(target);
      if (name.base === 'global_deny' && name.generation) return name.generation;
    }
  }
  return undefined;
}

/**
 * Renames every non-base chain to `NAME.generation` and every set and map to
 * `NAME.digest` of its contents (a map's verdicts name chains, so maps are
 * new with each generation), and every reference to them. A name in `avoid`
 * — a live set whose elements no longer match its name — is not taken: the
 * set is written anew under another, and the altered one goes with the old
 * generation.
 */
export function withGeneration(ruleset: Ruleset, generation: Generation, avoid: ReadonlySet<string> = new Set()): Ruleset {
  const chainNames = new Set(ruleset.chains.filter((c) => !c.hook).map((c) => c.name));
  const target = (name: string) => (chainNames.has(name) ? `${name}.${generation}` : name);
  const verdict = (v: Verdict): Verdict =>
    'jump' in v ? { jump: { target: target(v.jump.target) } } : 'goto' in v ? { goto: { target: target(v.goto.target) } } : v;
  const sets = ruleset.sets.map((set) => {
    const retargeted: SetDecl = set.verdicts ? { ...set, verdicts: set.verdicts.map(verdict) } : set;
    // A verdict map is new with each generation even when none of its verdicts names a chain yet (an
    // empty cgroup map): the app tracker adds elements that do, and they must not outlive their chains.
    const salt = retargeted.map ? generation : '';
    const name = contentName(retargeted, salt);
    return { ...retargeted, name: avoid.has(name) ? contentName(retargeted, `${salt}${generation}`) : name };
  });
  const setNames = new Map(ruleset.sets.map((set, i) => [set.name, sets[i]!.name]));
  const setRef = (value: unknown) => (typeof value === 'string' && value.startsWith('@') ? `@${setNames.get(value.slice(1)) ?? value.slice(1)}` : value);
  const statement = (s: Statement): Statement => {
    if ('match' in s) return { match: { ...s.match, right: setRef(s.match.right) as Element } };
    if ('vmap' in s) return { vmap: { ...s.vmap, data: setRef(s.vmap.data) as string } };
    if ('set' in s) return { set: { ...s.set, set: setRef(s.set.set) as string } };
    if ('jump' in s || 'goto' in s) return verdict(s);
    return s;
  };
  return {
    table: ruleset.table,
    sets,
    chains: ruleset.chains.map((chain): ChainDecl => ({
      ...chain,
      name: chain.hook ? chain.name : target(chain.name),
      rules: chain.rules.map((r) => ({ ...r, expr: r.expr.map(statement) })),
    })),
  };
}

/**
 * The policy in force: the base chain and the chains of the live
 * generation (an app's chain may be reached only through a cgroup map the
 * app tracker fills later), and what they reach — chains by jump and goto,
 * also through a verdict map's elements, and sets and maps by reference.
 * Anything else in the table is a leftover.
 */
export function reachable(listing: NftTableListing): { chains: Set<string>; sets: Set<string> } {
  const generation = liveGeneration(listing);
  const rulesOf = new Map<string, (typeof listing.rules)[number][]>();
  for (const r of listing.rules) {
    const rules = rulesOf.get(r.chain);
    if (rules) rules.push(r);
    else rulesOf.set(r.chain, [r]);
  }
  const maps = new Map(listing.maps.map((m) => [m.name, m]));
  const chains = new Set(
    listing.chains.filter((c) => c.hook !== undefined || (generation !== undefined && parseLiveName(c.name).generation === generation)).map((c) => c.name),
  );
  const sets = new Set<string>();
  const queue = [...chains];
  const visit = (found: { readonly chains: readonly string[]; readonly sets: readonly string[] }) => {
    for (const chain of found.chains) {
      if (!chains.has(chain)) {
        chains.add(chain);
        queue.push(chain);
      }
    }
    for (const set of found.sets) {
      if (sets.has(set)) continue;
      sets.add(set);
      const map = maps.get(set);
      if (map) visit(elementReferences(map));
    }
  };
  for (let chain = queue.pop(); chain !== undefined; chain = queue.pop()) for (const rule of rulesOf.get(chain) ?? []) visit(ruleReferences(rule));
  return { chains, sets };
}

/**
 * The swap, as two transactions:
 *   prepare — make sure the table and base chain exist, and add the new
 *             generation's sets, maps and chains, referenced by nothing yet;
 *   switch  — replace the base chain's rules (and policy) to use them.
 * Measured here: new sets and the rules that first use them must not commit
 * together. In one transaction, lookups missed for an instant after the
 * commit (our reading, not verified in the kernel source: a new set's lookup
 * data is published during the commit, after the generation has moved on),
 * and denied packets passed
 * under default allow — 25–72 of ~30,000–90,000 denied datagrams in 200
 * swaps — while a swap whose sets were committed earlier let none through.
 * Our rules always end in an explicit verdict, so the policy set early in
 * `prepare` changes nothing until `switch` — once a generation is in force;
 * before that (`firstSwitch`), prepare leaves the policy accepting, or a
 * first apply of a default deny would drop everything, loopback included,
 * between its two transactions (or for good, if killed there). `marker`, when given, is the
 * apply marker's full name (with the generation), added by `prepare`; sets
 * and maps named in `present` are in the table already, with these contents.
 */
export function swapTransactions(
  ruleset: Ruleset,
  marker?: string,
  present: ReadonlySet<string> = new Set(),
  options: { firstSwitch?: boolean } = {},
): { prepare: Command[]; switch: Command[] } {
  const base = ruleset.chains.find((c) => c.hook);
  if (!base?.hook) throw new Error('internal: a ruleset without a base chain');
  const { table } = ruleset;
  // With no generation in force yet the base chain may be empty, and then its policy decides every
  // packet: it starts accepting, as if the table were not there, and the switch sets it with the rules.
  const ensure: ChainDecl = { name: base.name, hook: { ...base.hook, policy: options.firstSwitch ? 'accept' : base.hook.policy }, rules: [] };
  const chains = ruleset.chains.filter((c) => c !== base);
  // `create`, not `add`: a chain block appends to a chain that exists, so two applies racing
  // for the same generation would mix their rules. Created, the second one is refused whole.
  const created = [...chains.map((c) => c.name), ...(marker ? [marker] : [])].map((chain) => command.createChain(table, chain));
  return {
    prepare: [
      command.block({ table, sets: [], chains: [ensure] }),
      ...created,
      command.block({ ...ruleset, sets: ruleset.sets.filter((set) => !present.has(set.name)), chains }),
    ],
    switch: [command.flushChain(table, base.name), command.block({ table, sets: [], chains: [base] })],
  };
}

/**
 * Removes the non-base chains and the sets and maps that `stale` picks.
 * Chains are emptied first (their rules hold the sets), then maps and sets
 * go (their elements may jump to chains), then the chains. Undefined when
 * there is nothing to remove.
 */
export function removalTransaction(
  names: NftTableNames,
  stale: { readonly chain: (name: string) => boolean; readonly set: (name: string) => boolean },
): Command[] | undefined {
  const chains = names.chains.filter((c) => c.hook === undefined && stale.chain(c.name)).map((c) => c.name);
  const maps = names.maps.filter((m) => stale.set(m.name)).map((m) => m.name);
  const sets = names.sets.filter((x) => stale.set(x.name)).map((x) => x.name);
  if (chains.length + maps.length + sets.length === 0) return undefined;
  return [
    ...chains.map((c) => command.flushChain(TABLE, c)),
    ...maps.map((m) => command.deleteMap(TABLE, m)),
    ...sets.map((x) => command.deleteSet(TABLE, x)),
    ...chains.map((c) => command.deleteChain(TABLE, c)),
  ];
}
