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
 *   name gets the policy's `deniedAnswer`. Denied by name: no connection to
 *   it, on any port or protocol, gets through this identity's chain (its
 *   app's rules, the global deny list, the default, as the table orders
 *   them; through a delegated cgroup's app and then its user's), and what
 *   denies it outright is a rule naming it (names, suffixes, lists). So an
 *   app rule allowing the name on one port outranks the global deny list
 *   for it (the identity may reach the name there, so it needs the true
 *   answer), unless an earlier deny of that app already takes that port. A
 *   deny of every destination, or a default deny, is not a denial by name:
 *   the kernel drops the connection, and the true answer tells the program
 *   nothing the table lets it use.
 * - A name strictly below a suffix that denies it to this identity by name
 *   is answered with that denied answer at admit, never asked upstream:
 *   its labels are the asker's to choose, and asked upstream they would
 *   carry whatever it encodes in them to the suffix's nameserver (DNS
 *   tunnelling), for an answer the asker never gets. A name the policy
 *   spells out (an exact name, a suffix's apex) is asked as before: nothing
 *   of it is the asker's, and its addresses go into the deny sets. So is a
 *   name denied only through its CNAME chain, known from the answer alone,
 *   and every name where the denied answer is the true answer.
 * - Anything else gets the true answer.
 */
import type { DnsBinding } from '../compile/compile.js';
import { placeAsker, type AskerPlace, type ExplainFacts, type Who as ExplainWho } from '../compile/explain.js';
import { buildNameIndex } from '../compile/names.js';
import type { App, Policy, PortRange, Rule } from '../policy/model.js';
import type { Admission, Question } from './server.js';
import type { Who } from './who.js';

/** What of DnsSettings (src/policy/model.ts) the decisions read. */
export interface DecideSettings {
  readonly deniedAnswer: 'nxdomain' | 'null' | 'true';
}

export interface Decider {
  /** Before anything goes upstream: 'go', or the answer given without asking ('null': the null answer). */
  admit(who: Who, question: Question): Admission;
  /** What this client gets, given every name of the answer's CNAME chain (question name first). */
  shape(who: Who, question: Question, chain: readonly string[]): 'answer' | 'nxdomain' | 'null';
  /** Indices into dnsBindings whose names cover any name of the chain: the sets an answer's addresses go into, sorted. */
  bindingsFor(chain: readonly string[]): readonly number[];
}

/** Mozilla's canary domain (support.mozilla.org, "Canary domain - use-application-dns.net"). */
export const CANARY = 'use-application-dns.net';

/** One rule as the decisions walk it: only rules that can match a name. */
interface Step {
  readonly verdict: 'allow' | 'deny';
  /** The connections it matches; undefined: every one (no ports, no protocols). */
  readonly space: Space | undefined;
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
  /** The chain that decides: its app's, or (no app) the global deny list and the default. */
  readonly app: Chain;
  readonly root: Chain | undefined;
}

interface Outcome {
  readonly verdict: 'allow' | 'deny';
  readonly byName: boolean;
}

/**
 * Connections to one name, by protocol and destination port: the rules'
 * limits cut it into pieces, so that "does any connection get through" has
 * an exact answer. `other` stands for every protocol a rule cannot name
 * (only a rule without limits matches it); ICMP has no ports.
 */
interface Space {
  readonly tcp: readonly PortRange[];
  readonly udp: readonly PortRange[];
  readonly icmp: boolean;
  readonly other: boolean;
}

const ALL_PORTS: readonly PortRange[] = [{ from: 0, to: 65535 }];
const FULL: Space = { tcp: ALL_PORTS, udp: ALL_PORTS, icmp: true, other: true };
const EMPTY: Space = { tcp: [], udp: [], icmp: false, other: false };

/** What a rule's ports and protocols match, as compile writes them: ports without protocols are tcp and udp; ICMP has no port to match. */
function ruleSpace(rule: Rule): Space | undefined {
  if (!rule.ports && !rule.protocols) return undefined;
  const protocols = rule.protocols ?? ['tcp', 'udp'];
  const ports = rule.ports ? joinRanges(rule.ports) : ALL_PORTS;
  return {
    tcp: protocols.includes('tcp') ? ports : [],
    udp: protocols.includes('udp') ? ports : [],
    icmp: protocols.includes('icmp') && !rule.ports,
    other: false,
  };
}

function joinRanges(ranges: readonly PortRange[]): PortRange[] {
  const sorted = [...ranges].sort((a, b) => a.from - b.from);
  const out: PortRange[] = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && r.from <= last.to + 1) out[out.length - 1] = { from: last.from, to: Math.max(last.to, r.to) };
    else out.push({ from: r.from, to: r.to });
  }
  return out;
}

function intersectRanges(a: readonly PortRange[], b: readonly PortRange[]): PortRange[] {
  const out: PortRange[] = [];
  for (const x of a)
    for (const y of b) if (Math.max(x.from, y.from) <= Math.min(x.to, y.to)) out.push({ from: Math.max(x.from, y.from), to: Math.min(x.to, y.to) });
  return joinRanges(out);
}

function subtractRanges(a: readonly PortRange[], b: readonly PortRange[]): PortRange[] {
  let out = [...a];
  for (const y of b)
    out = out.flatMap((x) =>
      y.to < x.from || y.from > x.to
        ? [x]
        : [...(x.from < y.from ? [{ from: x.from, to: y.from - 1 }] : []), ...(y.to < x.to ? [{ from: y.to + 1, to: x.to }] : [])],
    );
  return out;
}

const intersect = (a: Space, b: Space | undefined): Space =>
  b === undefined ? a : { tcp: intersectRanges(a.tcp, b.tcp), udp: intersectRanges(a.udp, b.udp), icmp: a.icmp && b.icmp, other: a.other && b.other };
const subtract = (a: Space, b: Space | undefined): Space =>
  b === undefined ? EMPTY : { tcp: subtractRanges(a.tcp, b.tcp), udp: subtractRanges(a.udp, b.udp), icmp: a.icmp && !b.icmp, other: a.other && !b.other };
const union = (a: Space, b: Space): Space => ({
  tcp: joinRanges([...a.tcp, ...b.tcp]),
  udp: joinRanges([...a.udp, ...b.udp]),
  icmp: a.icmp || b.icmp,
  other: a.other || b.other,
});
const isEmpty = (a: Space): boolean => a.tcp.length === 0 && a.udp.length === 0 && !a.icmp && !a.other;

export function buildDecider(policy: Policy, dnsBindings: readonly DnsBinding[], facts: ExplainFacts, settings: DecideSettings): Decider {
  const index = buildNameIndex(policy, dnsBindings);
  const bindingOf = new Map(dnsBindings.map((binding, i) => [binding.ruleId, i]));
  const step = (rule: Rule): Step | undefined => {
    const named = rule.to.names.length + rule.to.suffixes.length + rule.to.lists.length > 0;
    if (!rule.to.any && !named) return undefined;
    const binding = named ? bindingOf.get(rule.id) : undefined;
    if (named && binding === undefined) throw new Error(`internal: rule ${rule.id} names hosts but has no DNS binding`);
    return { verdict: rule.verdict, space: ruleSpace(rule), any: rule.to.any, binding };
  };
  const steps = (rules: readonly Rule[]): Step[] => rules.map(step).filter((s): s is Step => s !== undefined);
  const chains = new Map<string, Chain>(policy.apps.map((app) => [app.name, { steps: steps(app.rules), defaultVerdict: app.defaultVerdict }]));
  const chainOf = (app: App | undefined): Chain | undefined => (app ? chains.get(app.name) : undefined);
  const noApp: Chain = { steps: [], defaultVerdict: policy.defaults.egress };
  const globalSteps = steps(policy.globalDeny);
  const deniedAnswer = settings.deniedAnswer === 'true' ? 'answer' : settings.deniedAnswer;

  // By the Who object: the resolver's are interned (who.ts, one per uid and cgroup, bounded there), so no key is built per query
  // and what is kept goes with the identities still seen.
  const places = new WeakMap<Who, Place>();
  const placeOf = (who: Who): Place => {
    let place = places.get(who);
    if (!place) places.set(who, (place = toPlace(placeAsker(policy, explainWho(who), facts))));
    return place;
  };
  const toPlace = (asker: AskerPlace | { error: string }): Place => {
    if ('error' in asker) throw new Error(`internal: ${asker.error}`);
    return {
      refused: asker.torUpdater || asker.systemDomain !== undefined,
      unshaped: asker.torUser,
      app: chainOf(asker.app) ?? noApp,
      root: chainOf(asker.root),
    };
  };

  const covers = (s: Step, ids: readonly number[]): boolean => s.any || ids.includes(s.binding!);
  /**
   * The connections to the name that a chain lets out of `start`: its rules
   * in order (the first that matches a connection decides it), then the
   * global deny list, then its default — the table's order for every port
   * and protocol at once.
   */
  const allowed = (chain: Chain, ids: readonly number[], start: Space): Space => {
    let open = start;
    let out = EMPTY;
    for (const s of chain.steps) {
      if (isEmpty(open)) return out;
      if (!covers(s, ids)) continue;
      if (s.verdict === 'allow') out = union(out, intersect(open, s.space));
      open = subtract(open, s.space);
    }
    for (const s of globalSteps) if (covers(s, ids)) open = subtract(open, s.space);
    return chain.defaultVerdict === 'allow' ? union(out, open) : out;
  };
  /**
   * What explain answers for the name without a port or protocol: the first
   * rule without limits that matches it, then the global deny list (denied
   * by name when any rule of it without limits names the name), then the
   * default.
   */
  const unlimited = (chain: Chain, ids: readonly number[]): Outcome => {
    const first = chain.steps.find((s) => s.space === undefined && covers(s, ids));
    if (first) return { verdict: first.verdict, byName: !first.any };
    if (globalSteps.some((s) => s.space === undefined && !s.any && covers(s, ids))) return { verdict: 'deny', byName: true };
    if (globalSteps.some((s) => s.space === undefined && s.any)) return { verdict: 'deny', byName: false };
    return { verdict: chain.defaultVerdict, byName: false };
  };
  /**
   * Denied by name: no connection to it gets out (through a delegated
   * cgroup's app and then its user's or group's), and what denies it
   * outright is a rule naming it.
   */
  const deniedByName = (place: Place, name: string): boolean => {
    const ids = index.lookup(name);
    if (ids.length === 0) return false;
    let outcome = unlimited(place.app, ids);
    if (place.root && outcome.verdict === 'allow') outcome = unlimited(place.root, ids);
    // The common answer, without cutting ports: nothing denies the name outright by name.
    if (outcome.verdict !== 'deny' || !outcome.byName) return false;
    const open = allowed(place.app, ids, FULL);
    return isEmpty(place.root ? allowed(place.root, ids, open) : open);
  };

  return {
    admit(who, question) {
      const place = placeOf(who);
      if (place.refused) return 'refused';
      const name = question.name;
      if (name === CANARY || name.endsWith(`.${CANARY}`)) return 'nxdomain';
      // Labels below a denied suffix would reach its nameserver for an answer this asker never gets: answered here.
      if (deniedAnswer !== 'answer' && !place.unshaped && deniedByName(place, name) && !index.spelledOut(name)) return deniedAnswer;
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
 * no `socket cgroupv2 level N` selector holds a socket there. A gid without
 * a cgroup is left out (explain has no asker of a user and a group but a
 * cgroup's); sock_diag reports no gid, so identify never sets one, and group
 * selectors hold a socket by its uid's membership.
 */
export function explainWho(who: Who): ExplainWho {
  if (who.cgroup === undefined || who.cgroup === '') return { kind: 'user', user: who.uid };
  return { kind: 'cgroup', path: who.cgroup, user: who.uid, ...(who.gid !== undefined ? { group: who.gid } : {}) };
}
