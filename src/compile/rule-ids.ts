import { hash } from 'node:crypto';
import type { App, Origin, Policy, Rule, SystemDomain, Verdict } from '../policy/model.js';

/**
 * Short rule ids: what the kernel carries (log prefix, rule comments) so that
 * a denial, a counter or a listing maps back to the policy rule that made it.
 *
 * A policy rule's own id ("app/firefox/2", "deny/10-phone-home.yaml/0")
 * counts its position, so a rule written above it would renumber it. The
 * short id is a digest of what the rule is instead — its owner (the app, or
 * the global deny list), its verdict, its destinations as written, its ports
 * and protocols — so it stays while the rule stands, wherever it moves, and
 * changes when the rule means something else. A list file or catalogue
 * entry behind a rule can change without changing its id (it is named, not
 * copied, into the identity); `log`, `why` and file:line are not identity.
 * Two rules of one owner that are alike in all of it are told apart by
 * their order among themselves. The built-in decisions (defaults, system
 * domains, lockdown, Tor, the resolver's DNS rules, the routing-header and SYN-cookie drops) are identified by
 * their ids, which name them.
 */

/** Every kind of deciding rule; rules.json is checked against this list. */
export const RULE_KINDS = [
  'app-rule',
  'app-default',
  'global-deny',
  'default',
  'system-domain',
  'lockdown',
  'tor-updaters',
  'tor-socks',
  'tor-socks-answer',
  'tor-own',
  'routing-header',
  'syn-cookies',
  'dns-resolver',
  'dns-exclusive',
] as const;

export type RuleKind = (typeof RULE_KINDS)[number];

/** One row of the id table: a short id and the rule it stands for. */
export interface RuleIdEntry {
  /** "r" and 8 hex digits: "r1a2b3c4d". */
  readonly id: string;
  /** The policy's own id: "app/firefox/2", "sd/offline", "default". */
  readonly ruleId: string;
  readonly kind: RuleKind;
  readonly verdict: Verdict;
  /** Where the rule is written, relative to the policy directory; absent for built-in rules (lockdown). */
  readonly file?: string;
  readonly line?: number;
  readonly app?: string;
  readonly domain?: string;
}

/** The resolver's own DNS packets (its mark), let out whatever the policy says. */
export const DNS_RESOLVER_RULE = 'dns/resolver';
/** Packets from Tor's SOCKS port on loopback whose socket is neither Tor's user's nor root's (a listener standing in for Tor), dropped. */
export const TOR_SOCKS_ANSWER_RULE = 'tor/socks-answer';

/** A SOCKS port on this machine's loopback, which any local user's program could hold; one on another host is network. */
export function socksOnLoopback(socks: { readonly family: 4 | 6; readonly address: string }): boolean {
  return socks.family === 4 ? socks.address.startsWith('127.') : socks.address === '::1';
}

/** SYN-ACKs sent with SYN cookies, dropped while a system domain has members found by user or group (synCookieGuard). */
export const SYN_COOKIES_RULE = 'syn-cookies';

/**
 * The first system domain with a member found by user or group, whose
 * members' SYN cookies the table must drop: a closed socket keeps no user or
 * group, so what such a member left to one on a connection its SYN cookie
 * opened would leave without an owner (compile.ts, synCookieRules). Members
 * found by cgroup keep their cgroup, and need no such drop.
 */
export function synCookieGuard(policy: Policy): SystemDomain | undefined {
  return policy.systemDomains.find((domain) => domain.members.some((m) => m.selectors.some((s) => s.kind === 'user' || s.kind === 'group')));
}

/** Everyone else's DNS packets, dropped while `dns.exclusive`. */
export const DNS_EXCLUSIVE_RULE = 'dns/exclusive';

/** A short id, as a pattern to build the others from: log prefixes, comments and rules.json hold it. */
export const SHORT_ID_PATTERN = 'r[0-9a-f]{8}';
export const SHORT_ID = new RegExp(`^${SHORT_ID_PATTERN}$`);

/** What a short id is a digest of; replaceable in tests to force collisions. */
export type IdDigest = (identity: string, attempt: number) => string;

const sha256Id: IdDigest = (identity, attempt) => `r${hash('sha256', attempt === 0 ? identity : `${identity}\0${attempt}`, 'hex').slice(0, 8)}`;

/** A rule before it has its short id: what identifies it, and its row of the table. */
export interface Candidate {
  readonly identity: string;
  readonly entry: Omit<RuleIdEntry, 'id'>;
}

/**
 * Every rule the policy compiles to that decides a packet, with its short
 * id, in the order the compiler meets them. `lockdown` adds the kill switch's
 * own rule. Pure; the compiler and `explain` both call it.
 */
export function ruleIdTable(policy: Policy, options: { readonly lockdown?: boolean } = {}, digest: IdDigest = sha256Id): RuleIdEntry[] {
  const candidates: Candidate[] = [];
  const builtIn = (ruleId: string, kind: RuleKind, verdict: Verdict, at: Origin | undefined, owner: { app?: string; domain?: string } = {}) =>
    candidates.push({ identity: JSON.stringify(['built-in', ruleId, verdict]), entry: { ruleId, kind, verdict, ...where(at), ...owner } });

  builtIn('routing-header', 'routing-header', 'deny', undefined);
  for (const domain of policy.systemDomains) builtIn(`sd/${domain.name}`, 'system-domain', 'deny', domain.at, { domain: domain.name });
  const guard = synCookieGuard(policy);
  if (guard) builtIn(SYN_COOKIES_RULE, 'syn-cookies', 'deny', guard.at);
  if (policy.tor.enabled) {
    builtIn('tor/updaters', 'tor-updaters', 'deny', policy.tor.at);
    builtIn('tor/socks', 'tor-socks', 'allow', policy.tor.at);
    if (socksOnLoopback(policy.tor.socks)) builtIn(TOR_SOCKS_ANSWER_RULE, 'tor-socks-answer', 'deny', policy.tor.at);
  }
  if (options.lockdown) builtIn('lockdown', 'lockdown', 'deny', undefined);
  if (policy.tor.enabled) builtIn('tor/own', 'tor-own', 'allow', policy.tor.at);
  builtIn(DNS_RESOLVER_RULE, 'dns-resolver', 'allow', undefined);
  if (policy.dns.exclusive) builtIn(DNS_EXCLUSIVE_RULE, 'dns-exclusive', 'deny', undefined);
  for (const app of policy.apps) {
    candidates.push(...policyRules(`app/${app.name}`, app.rules, 'app-rule', { app: app.name }));
    builtIn(`app/${app.name}/default`, 'app-default', app.defaultVerdict, app.at, { app: app.name });
  }
  candidates.push(...policyRules('deny', policy.globalDeny, 'global-deny', {}));
  for (const app of appsWithOwnGlobalDeny(policy)) candidates.push(...policyRules(`deny@app/${app.name}`, policy.globalDeny, 'global-deny', { app: app.name }));
  builtIn('default', 'default', policy.defaults.egress, policy.defaults.at);
  return assignShortIds(candidates, digest);
}

/**
 * The apps that meet the global deny list in a copy of their own (compile.ts),
 * whose rules carry short ids of their own, each naming the app in the id
 * table: the apps chosen by cgroup. NFLOG hands the denial reader the
 * sender's uid and gid, never its cgroup, so a denial by the shared list
 * could not say which of them sent it — and without the app, the alert can
 * offer no "Allow". An app chosen by user or group alone is told by the uid
 * (denials/attribute.ts), and shares the list. The copies share the list's
 * sets: they add rules, not elements.
 */
export function appsWithOwnGlobalDeny(policy: Policy): readonly App[] {
  if (policy.globalDeny.length === 0) return [];
  return policy.apps.filter((app) => app.identities.some((identity) => identity.selectors.some((s) => s.kind === 'cgroup')));
}

/** What tells an entry of the id table apart from the others: its rule, and for a global rule's copy the app it is copied for. */
export function entryKey(ruleId: string, copyFor?: string): string {
  return copyFor === undefined ? ruleId : `${ruleId}\0${copyFor}`;
}

/** An entry's key (entryKey): a global rule's entry that names an app is that app's copy. */
export function keyOfEntry(entry: Pick<RuleIdEntry, 'ruleId' | 'kind' | 'app'>): string {
  return entryKey(entry.ruleId, entry.kind === 'global-deny' ? entry.app : undefined);
}

/**
 * The short id the kernel carries for a decision: its rule's, or for a
 * global rule that decided in the chain of an app with a copy of its own,
 * that copy's.
 */
export function shortIdOf(table: readonly RuleIdEntry[], decision: { readonly ruleId: string; readonly app?: string }): string | undefined {
  const wanted = [entryKey(decision.ruleId, decision.app), entryKey(decision.ruleId)];
  for (const key of wanted) {
    const entry = table.find((e) => keyOfEntry(e) === key);
    if (entry) return entry.id;
  }
  return undefined;
}

function where(at: Origin | undefined): { file?: string; line?: number } {
  return at ? { file: at.file, line: at.line } : {};
}

/** A policy rule is what it matches and what it does, under its owner; alike rules count among themselves. */
function policyRules(owner: string, rules: readonly Rule[], kind: RuleKind, names: { app?: string }): Candidate[] {
  const seen = new Map<string, number>();
  return rules.map((r) => {
    const ports = r.ports?.map((p) => (p.from === p.to ? `${p.from}` : `${p.from}-${p.to}`)).sort() ?? null;
    const what = JSON.stringify(['rule', owner, r.verdict, r.to.any ? 'any' : r.to.written, ports, r.protocols ? [...r.protocols].sort() : null]);
    const alike = seen.get(what) ?? 0;
    seen.set(what, alike + 1);
    return { identity: alike === 0 ? what : `${what}#${alike}`, entry: { ruleId: r.id, kind, verdict: r.verdict, ...where(r.at), ...names } };
  });
}

/**
 * Short ids for distinct identities. Two identities whose digests collide
 * are told apart deterministically: in the identities' sorted order, the
 * first keeps its digest and the next takes the digest's next attempt — so
 * the result depends on the set of identities only, never on their order.
 */
export function assignShortIds(candidates: readonly Candidate[], digest: IdDigest = sha256Id): RuleIdEntry[] {
  const owners = new Map<string, string>();
  const ids = new Map<string, string>();
  for (const identity of [...new Set(candidates.map((c) => c.identity))].sort()) {
    for (let attempt = 0; ; attempt++) {
      if (attempt > 64) throw new Error(`internal: no free short id for ${identity}`);
      const id = digest(identity, attempt);
      if (!SHORT_ID.test(id)) throw new Error(`internal: short id ${JSON.stringify(id)} is not r and 8 hex digits`);
      if (owners.has(id)) continue;
      owners.set(id, identity);
      ids.set(identity, id);
      break;
    }
  }
  const entries = candidates.map((c) => ({ id: ids.get(c.identity)!, ...c.entry }));
  const keys = new Set<string>();
  for (const entry of entries) {
    // Two rules with one identity would share an id; policyRules counts alike rules so that they cannot.
    const key = keyOfEntry(entry);
    if (keys.has(key)) throw new Error(`internal: rule id ${entry.ruleId}${entry.app === undefined ? '' : ` (app ${entry.app})`} twice in the id table`);
    keys.add(key);
  }
  if (new Set(entries.map((e) => e.id)).size !== entries.length) throw new Error('internal: two rules share a short id');
  return entries;
}

/** "file:line" of an entry, or "(built in)". */
export function entryOrigin(entry: Pick<RuleIdEntry, 'file' | 'line'>): string {
  return entry.file === undefined ? '(built in)' : `${entry.file}:${entry.line ?? 0}`;
}
