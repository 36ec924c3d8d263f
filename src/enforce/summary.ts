import { createHash } from 'node:crypto';
import { POLICY_MARK } from '../compile/compile.js';
import { SHORT_ID_PATTERN } from '../compile/rule-ids.js';
import type { Ruleset, SetDecl, Verdict } from '../compile/ruleset.js';
import { elementsOf } from '../nft/listing.js';
import type { NftJson, NftListedKey, NftTableListing } from '../nft/types.js';
import { baseName, isApplyMarker, reachable } from './swap.js';

/**
 * A table reduced to what can be compared between the compiled form and a
 * live listing: rules by their comments (which end in a fingerprint of the
 * compiled rule, and which nft keeps verbatim), and sets by name, kind and —
 * for the static ones — their elements.
 */
export interface TableSummary {
  /** The policy digest from the first rule, if there is one. */
  readonly digest: string | undefined;
  readonly lockdown: boolean;
  readonly chains: ReadonlyMap<string, readonly RuleSummary[]>;
  readonly sets: ReadonlyMap<string, SetSummary>;
}

export interface RuleSummary {
  readonly comment: string;
  /** The rule id from the comment ("app/firefox/2"), or the whole comment for structural rules. */
  readonly id: string;
  /** The short id the comment starts with (compile/rule-ids.ts), for rules that decide for a policy rule. */
  readonly shortId: string | undefined;
  /** The rule drops what it matches (a denial counter). */
  readonly drops: boolean;
  readonly packets: number | undefined;
  readonly bytes: number | undefined;
}

export interface SetSummary {
  readonly kind: 'set' | 'map';
  /** Filled at run time (DNS answers, cgroups): only their size is compared. */
  readonly dynamic: boolean;
  readonly size: number;
  /** A digest of the elements, normalised and sorted: static sets are compared by it. */
  readonly contents: string;
}

const FINGERPRINT = / #[0-9a-f]{8}$/;
/** A comment that starts with a short id: the id, then file:line (absent for built-in rules), then the rule id and an optional note. */
const TAGGED = new RegExp(String.raw`^(${SHORT_ID_PATTERN}) (?:\S+:\d+ )?(\S+?)(?::(?: .*)?)?$`);

/**
 * A rule's ids from its comment: "r1a2b3c4d file:line id[: note]" for a rule
 * that decides for a policy rule, "file:line text" or bare text for the rest.
 */
export function idsOfComment(comment: string): { id: string; shortId: string | undefined } {
  const bare = comment.replace(FINGERPRINT, '');
  const tagged = TAGGED.exec(bare);
  if (tagged) return { id: tagged[2]!, shortId: tagged[1]! };
  const match = /^\S+:\d+ (\S+)/.exec(bare);
  return { id: match ? match[1]! : bare, shortId: undefined };
}

function digestFrom(comment: string | undefined): string | undefined {
  if (!comment) return undefined;
  const at = comment.indexOf(POLICY_MARK);
  return at < 0
    ? undefined
    : comment
        .slice(at + POLICY_MARK.length)
        .replace(FINGERPRINT, '')
        .trim();
}

/** Compiled sets that the run time fills: DNS sets (timeout) and identity maps keyed by cgroup. */
function isDynamic(name: string, flags: readonly string[]): boolean {
  return flags.includes('timeout') || /_cg_l\d+$/.test(name);
}

/** Kept instead of the elements themselves: a summary of 100,000 CIDRs stays small enough to save with each apply. */
function contentsDigest(elements: string[]): string {
  return createHash('sha256').update(elements.sort().join('\n')).digest('hex');
}

function elementString(element: NftListedKey): string {
  if (typeof element === 'string' || typeof element === 'number') return String(element);
  if ('prefix' in element) return `${element.prefix.addr}/${element.prefix.len}`;
  return `${elementString(element.range[0])}-${elementString(element.range[1])}`;
}

/** Compiled and live verdicts alike, their targets without generation. */
function verdictString(verdict: Verdict): string {
  if ('jump' in verdict) return `jump ${baseName(verdict.jump.target)}`;
  if ('goto' in verdict) return `goto ${baseName(verdict.goto.target)}`;
  return Object.keys(verdict)[0]!;
}

/** One element as summaries digest it: `key`, or `key : verdict` in a map. */
function entryString(key: NftListedKey, data: Verdict | undefined): string {
  return data === undefined ? elementString(key) : `${elementString(key)} : ${verdictString(data)}`;
}

export function summarizeCompiled(ruleset: Ruleset): TableSummary {
  const chains = new Map<string, RuleSummary[]>();
  for (const chain of ruleset.chains) {
    chains.set(
      chain.name,
      chain.rules.map((r) => ({
        comment: r.comment ?? '',
        ...idsOfComment(r.comment ?? ''),
        drops: r.expr.some((e) => 'drop' in e),
        packets: undefined,
        bytes: undefined,
      })),
    );
  }
  const sets = new Map(ruleset.sets.map((set) => [set.name, summarizeSet(set)]));
  const output = ruleset.chains.find((c) => c.name === 'output');
  return { digest: digestFrom(output?.rules.find((r) => r.comment?.includes(POLICY_MARK))?.comment), lockdown: chains.has('lockdown'), chains, sets };
}

/** A compiled set or map as summaries compare it (its name, withGeneration's or not, decides nothing). */
export function summarizeSet(set: SetDecl): SetSummary {
  const elements = set.elements.map((element, i) => entryString(element, set.map ? set.verdicts![i] : undefined));
  return { kind: set.map ? 'map' : 'set', dynamic: isDynamic(baseName(set.name), set.flags), size: elements.length, contents: contentsDigest(elements) };
}

/** The live sets and maps the base chain reaches (`inUse`), by their live names (with digest). */
export function liveSets(listing: NftTableListing, inUse: ReadonlySet<string> = reachable(listing).sets): Map<string, SetSummary> {
  const sets = new Map<string, SetSummary>();
  for (const [kind, list] of [
    ['set', listing.sets],
    ['map', listing.maps],
  ] as const) {
    for (const set of list) {
      if (!inUse.has(set.name)) continue;
      const elements = elementsOf(set).map((element) => entryString(element.key, element.data));
      sets.set(set.name, { kind, dynamic: isDynamic(baseName(set.name), set.flags ?? []), size: elements.length, contents: contentsDigest(elements) });
    }
  }
  return sets;
}

/**
 * The policy in force in a live table: what its base chain reaches (leftovers
 * of an interrupted apply are left out). A caller that has worked out
 * `inForce` and `sets` already passes them: at 100,000 elements digesting the
 * sets costs tens of milliseconds.
 */
export function summarizeLive(
  listing: NftTableListing,
  inForce: { readonly chains: ReadonlySet<string>; readonly sets: ReadonlySet<string> } = reachable(listing),
  sets: ReadonlyMap<string, SetSummary> = liveSets(listing, inForce.sets),
): TableSummary {
  const live = (chain: string) => inForce.chains.has(chain) && !isApplyMarker(chain);
  const chains = new Map<string, RuleSummary[]>();
  // Live names carry a generation or a digest (see swap.ts); summaries compare without it.
  for (const chain of listing.chains) if (live(chain.name)) chains.set(baseName(chain.name), []);
  for (const r of listing.rules) {
    if (!live(r.chain)) continue;
    const counter = r.expr.map(counterOf).find((c) => c !== undefined);
    const comment = r.comment ?? '';
    const drops = r.expr.some((e) => e !== null && typeof e === 'object' && !Array.isArray(e) && 'drop' in e);
    chains.get(baseName(r.chain))?.push({ comment, ...idsOfComment(comment), drops, packets: counter?.packets, bytes: counter?.bytes });
  }
  const byBaseName = new Map([...sets].map(([name, set]) => [baseName(name), set]));
  const output = listing.rules.find((r) => r.chain === 'output' && r.comment?.includes(POLICY_MARK));
  return { digest: digestFrom(output?.comment), lockdown: chains.has('lockdown'), chains, sets: byBaseName };
}

function counterOf(expr: NftJson): { packets: number; bytes: number } | undefined {
  if (!expr || typeof expr !== 'object' || Array.isArray(expr) || !('counter' in expr)) return undefined;
  const counter = expr['counter'];
  if (!counter || typeof counter !== 'object' || Array.isArray(counter)) return undefined;
  return { packets: Number(counter['packets'] ?? 0), bytes: Number(counter['bytes'] ?? 0) };
}
