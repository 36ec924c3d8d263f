/**
 * What the resolver does with a query, by who asks and what the answer
 * names: pure (no system access), built once per applied policy and asked
 * once or twice per query.
 *
 * Precedence is explain's (src/compile/explain.ts), which is the table's:
 * system domain > Tor > app > global deny > default. Who belongs where is
 * found by explain's own `placeAsker` (the kernel's dispatch order, subordinate
 * ranges, group members, delegated cgroups), not a second matcher.
 *
 * - A member of a system domain has no network, and an updater confined to
 *   Tor must resolve inside Tor: both are REFUSED, whatever they ask.
 * - `use-application-dns.net` and every name below it are NXDOMAIN (Mozilla's
 *   canary: it turns Firefox's own DNS over HTTPS off by default; RFC 8020:
 *   nothing is below a name that does not exist).
 * - An answer whose CNAME chain holds a name denied to this identity by
 *   name gets the policy's `deniedAnswer`. Denied by name: the app's chain
 *   for this identity meets a deny rule naming it (names, suffixes, lists)
 *   before any rule that allows it, or meets none and the global deny list
 *   names it. An app rule allowing the name on some ports or protocols
 *   only still counts as allowing it: the identity may reach it there, so
 *   it needs the true answer; a deny rule limited to ports or protocols is
 *   not a denial of the name. A deny of every destination, or a default
 *   deny, is not a denial by name: the kernel drops the connection, and the
 *   true answer tells the program nothing the table lets it use.
 * - Anything else gets the true answer.
 */
import type { DnsBinding } from '../compile/compile.js';
import { placeAsker, type AskerPlace, type ExplainFacts, type Who as ExplainWho } from '../compile/explain.js';
import { buildNameIndex } from '../compile/names.js';
import type { App, Policy, Rule } from '../policy/model.js';
import type { Who } from './who.js';

/** As src/resolver/server.ts (helper B) declares it. */
export interface Question {
  readonly name: string;
  readonly type: string;
}

/** What of DnsSettings (src/policy/model.ts) the decisions read. */
export interface DecideSettings {
  readonly deniedAnswer: 'nxdomain' | 'null' | 'true';
}

export interface Decider {
  /** Before anything goes upstream. */
  admit(who: Who, question: Question): 'go' | 'refused' | 'nxdomain';
  /** What this client gets, given every name of the answer's CNAME chain (question name first). */
  shape(who: Who, question: Question, chain: readonly string[]): 'answer' | 'nxdomain' | 'null';
  /** Indices into dnsBindings whose names cover any name of the chain: the sets an answer's addresses go into, sorted. */
  bindingsFor(chain: readonly string[]): readonly number[];
}

/** Mozilla's canary domain (support.mozilla.org, "Canary domain - use-application-dns.net"). */
export const CANARY = 'use-application-dns.net';

/** Identities remembered at once; past this the memo starts again (a user can make cgroups without end). */
const MEMO_LIMIT = 16_384;

/** One app rule as the decisions walk it: only rules that can match a name. */
interface Step {
  readonly verdict: 'allow' | 'deny';
  /** Limited to some ports or protocols. */
  readonly limited: boolean;
  /** Matches every destination. */
  readonly any: boolean;
  /** Its index in dnsBindings, for a rule with names. */
  readonly binding: number | undefined;
}

interface Chain {
  readonly steps: readonly Step[];
  readonly defaultVerdict: 'allow' | 'deny';
}

/** Where an identity stands, once per identity. */
interface Place {
  readonly refused: boolean;
  /** Tor's own user: its traffic is accepted before apps and the global deny list. */
  readonly unshaped: boolean;
  readonly app: Chain | undefined;
  readonly root: Chain | undefined;
}

interface Outcome {
  readonly verdict: 'allow' | 'deny';
  readonly byName: boolean;
}

export function buildDecider(policy: Policy, dnsBindings: readonly DnsBinding[], facts: ExplainFacts, settings: DecideSettings): Decider {
  const index = buildNameIndex(policy, dnsBindings);
  const bindingOf = new Map(dnsBindings.map((binding, i) => [binding.ruleId, i]));
  const step = (rule: Rule): Step | undefined => {
    const named = rule.to.names.length + rule.to.suffixes.length + rule.to.lists.length > 0;
    if (!rule.to.any && !named) return undefined;
    const binding = named ? bindingOf.get(rule.id) : undefined;
    if (named && binding === undefined) throw new Error(`internal: rule ${rule.id} names hosts but has no DNS binding`);
    return { verdict: rule.verdict, limited: rule.ports !== undefined || rule.protocols !== undefined, any: rule.to.any, binding };
  };
  const steps = (rules: readonly Rule[]): Step[] => rules.map(step).filter((s): s is Step => s !== undefined);
  const chains = new Map<string, Chain>(policy.apps.map((app) => [app.name, { steps: steps(app.rules), defaultVerdict: app.defaultVerdict }]));
  const chainOf = (app: App | undefined): Chain | undefined => (app ? chains.get(app.name) : undefined);
  // Only a deny of every port and protocol that names the name denies it by name.
  const globalByName = new Set(
    steps(policy.globalDeny)
      .filter((s) => !s.limited && s.binding !== undefined)
      .map((s) => s.binding!),
  );
  const deniedAnswer = settings.deniedAnswer === 'true' ? 'answer' : settings.deniedAnswer;

  const memo = new Map<string, Place>();
  const placeOf = (who: Who): Place => {
    const key = `${who.uid}/${who.gid ?? ''}/${who.cgroup ?? '\0'}`;
    let place = memo.get(key);
    if (!place) {
      place = toPlace(placeAsker(policy, explainWho(who), facts));
      if (memo.size >= MEMO_LIMIT) memo.clear();
      memo.set(key, place);
    }
    return place;
  };
  const toPlace = (asker: AskerPlace | { error: string }): Place => {
    if ('error' in asker) throw new Error(`internal: ${asker.error}`);
    return {
      refused: asker.torUpdater || asker.systemDomain !== undefined,
      unshaped: asker.torUser,
      app: chainOf(asker.app),
      root: chainOf(asker.root),
    };
  };

  const globalDeny = (ids: readonly number[]): boolean => ids.some((id) => globalByName.has(id));
  /** An app's chain for one name: its rules in order, then the global deny list, then its default. */
  const walk = (chain: Chain, ids: readonly number[]): Outcome => {
    for (const s of chain.steps) {
      if (!s.any && !ids.includes(s.binding!)) continue;
      if (s.verdict === 'allow') return { verdict: 'allow', byName: !s.any };
      if (!s.limited) return { verdict: 'deny', byName: !s.any };
    }
    if (globalDeny(ids)) return { verdict: 'deny', byName: true };
    return { verdict: chain.defaultVerdict, byName: false };
  };
  const deniedByName = (place: Place, name: string): boolean => {
    const ids = index.lookup(name);
    if (ids.length === 0) return false;
    if (!place.app) return globalDeny(ids);
    let outcome = walk(place.app, ids);
    // A delegated cgroup's allow goes on to its user's or group's app (explain's `delegatedMember`).
    if (outcome.verdict === 'allow' && place.root) outcome = walk(place.root, ids);
    return outcome.verdict === 'deny' && outcome.byName;
  };

  return {
    admit(who, question) {
      if (placeOf(who).refused) return 'refused';
      const name = question.name;
      if (name === CANARY || name.endsWith(`.${CANARY}`)) return 'nxdomain';
      return 'go';
    },
    shape(who, _question, chain) {
      const place = placeOf(who);
      // Never asked for one admit refused; if it is, nothing leaks.
      if (place.refused) return 'nxdomain';
      if (place.unshaped) return 'answer';
      return chain.some((name) => deniedByName(place, name)) ? deniedAnswer : 'answer';
    },
    bindingsFor(chain) {
      if (chain.length === 1) return index.lookup(chain[0]!);
      const all = new Set<number>();
      for (const name of chain) for (const id of index.lookup(name)) all.add(id);
      return [...all].sort((a, b) => a - b);
    },
  };
}

/**
 * The resolver's identity as explain asks it: a socket in a cgroup, with its
 * uid (and gid when known), or a uid alone. The root cgroup is no cgroup:
 * no `socket cgroupv2 level N` selector holds a socket there.
 */
export function explainWho(who: Who): ExplainWho {
  if (who.cgroup === undefined || who.cgroup === '') return { kind: 'user', user: who.uid };
  return { kind: 'cgroup', path: who.cgroup, user: who.uid, ...(who.gid !== undefined ? { group: who.gid } : {}) };
}
