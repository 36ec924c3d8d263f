import { isIP } from 'node:net';
import { addressGroups, asciiName, inetAton, networkContains, parseNetwork } from '../policy/destination.js';
import { clip } from '../policy/issues.js';
import { DNS_PORTS, type Identity, type Origin, type Policy, type Protocol, type Rule, type Selector } from '../policy/model.js';
import { identitiesOverlap } from '../policy/resolve.js';
import type { Facts, IdRange, SubordinateIds } from './compile.js';
import { cgroupAncestorMatching } from './glob.js';
import { DNS_EXCLUSIVE_RULE, DNS_RESOLVER_RULE, socksOnLoopback, TOR_SOCKS_ANSWER_RULE } from './rule-ids.js';
import type { NameTable } from '../policy/name-table.js';

/**
 * Who is asking, as `egressctl explain --app` takes it: an app or identity
 * name, or a concrete user, group, unit or cgroup.
 */
export type Who =
  | { readonly kind: 'name'; readonly name: string }
  | { readonly kind: 'user'; readonly user: string | number }
  | { readonly kind: 'group'; readonly group: string | number }
  | {
      readonly kind: 'cgroup';
      readonly path: string;
      /** The socket's user and group, when asked with a cgroup (they matter where the cgroup is delegated). */
      readonly user?: string | number;
      readonly group?: string | number;
    };

export interface ExplainQuery {
  readonly who: Who;
  readonly host: string;
  readonly port?: number;
  readonly proto?: Protocol;
  /** The packet's mark (the socket's SO_MARK); undefined: none. The resolver's upstream sockets carry `dns.mark`. */
  readonly mark?: number;
  /**
   * For an address: the CNAME chains (question first) the running resolver
   * learned it from (its memory). The kernel matches a name rule for an
   * address while the rule's sets hold it, so each rule whose names cover a
   * name of one of these chains matches the address too — unless it spares
   * shared addresses and another chain has no name of its (fill.ts).
   */
  readonly learnedChains?: readonly (readonly string[])[];
}

export type Level = 'loopback' | 'system-domain' | 'lockdown' | 'tor' | 'dns' | 'app' | 'global-deny' | 'default';

export interface Explanation {
  readonly verdict: 'allow' | 'deny';
  readonly level: Level;
  readonly ruleId: string;
  readonly at: Origin | undefined;
  readonly why: string | undefined;
  /** The app whose chain decided (its rule, the global deny list or its default); absent when no app's did. */
  readonly app?: string;
  /** The path taken, one line per precedence level, for people. */
  readonly steps: readonly string[];
  /** Caveats: what the answer depends on that a policy cannot know (DNS answers). */
  readonly notes: readonly string[];
}

/** The ids of the user and group names the policy and the question mention, with subordinate ranges and group members, and who owns which cgroup, as compile takes them. */
export type ExplainFacts = Pick<Facts, 'users' | 'groups' | 'subordinate' | 'members' | 'cgroupOwners'>;

/**
 * Walks the fixed precedence — loopback, system domain, lockdown, Tor, DNS,
 * app, global deny, default — over the loaded policy, the same order the compiled
 * table takes, and says which rule decides. For an address its verdict is the
 * compiled table's for that packet; test/compile/explain-agrees.test.ts checks
 * that over random policies, so a change to either side that breaks it fails.
 */
export function explain(policy: Policy, query: ExplainQuery, facts: ExplainFacts, options: { lockdown?: boolean } = {}): Explanation | { error: string } {
  const steps: string[] = [];
  const notes: string[] = [];
  const classified = classifyHost(query.host);
  const target = 'error' in classified ? classified : { ...classified, learned: query.learnedChains ?? [] };
  if ('error' in target) return target;
  if (target.note) notes.push(target.note);
  const belongs = membership(policy, query.who, facts);
  if ('error' in belongs) return belongs;
  const decide = (verdict: 'allow' | 'deny', level: Level, ruleId: string, at: Origin | undefined, why?: string, app?: string): Explanation => {
    // The table drops these before any other rule (compile.ts, routingHeaderRules): the answer is for a packet without one.
    // An allow that a later decision overrules (deny wins over a delegated cgroup) takes its note back.
    const noted = notes.indexOf(ROUTING_HEADER_NOTE);
    if (verdict === 'allow' && target.family !== 4) {
      if (noted < 0) notes.push(ROUTING_HEADER_NOTE);
    } else if (noted >= 0) notes.splice(noted, 1);
    return { verdict, level, ruleId, at, why, ...(app !== undefined && { app }), steps, notes };
  };

  /** An app's chain: its rules, then the global deny list, then its default. */
  const appDecision = (chosen: Policy['apps'][number]): Explanation => {
    for (const rule of chosen.rules) {
      const outcome = ruleMatches(policy, rule, target, query, notes);
      if (outcome) {
        steps.push(`app "${chosen.name}": rule ${rule.id} matches (${outcome})`);
        return decide(rule.verdict, 'app', rule.id, rule.at, rule.why, chosen.name);
      }
    }
    steps.push(`app "${chosen.name}": no rule matches`);
    const denied = globalDeny(chosen.name);
    if (denied) return denied;
    steps.push(`default of app "${chosen.name}": ${chosen.defaultVerdict}`);
    return decide(chosen.defaultVerdict, 'default', `app/${chosen.name}/default`, chosen.at, chosen.why, chosen.name);
  };

  const globalDeny = (app?: string): Explanation | undefined => {
    for (const rule of policy.globalDeny) {
      const outcome = ruleMatches(policy, rule, target, query, notes);
      if (outcome) {
        steps.push(`global deny: rule ${rule.id} matches (${outcome})`);
        return decide('deny', 'global-deny', rule.id, rule.at, rule.why, app);
      }
    }
    steps.push('global deny: no rule matches');
    return undefined;
  };

  const torUser = policy.tor.enabled && isTorUser(policy, query.who, facts);
  const sdMember = policy.systemDomains.find((domain) => domain.members.some(belongs));

  // Whoever asks, a connection to a SOCKS port on loopback is answered only by Tor (or root): the table drops what any
  // other listener there sends back (tor/socks-answer). Who answers is not who asks, so it is said, not decided here.
  const { socks } = policy.tor;
  const socksLoopback = socksOnLoopback(socks);
  const toSocks = target.ip === socks.address && (query.port === undefined || query.port === socks.port) && (query.proto ?? 'tcp') === 'tcp';
  if (policy.tor.enabled && socksLoopback && toSocks)
    notes.push(
      `${TOR_SOCKS_ANSWER_RULE}: only Tor's user ${JSON.stringify(policy.tor.user)} or root may answer from ${socksAt(socks)}; if another user's program holds the port, the connection is never answered`,
    );

  // Updaters over Tor are dispatched before loopback: they reach only the SOCKS port.
  if (policy.tor.enabled && policy.tor.updaters.some(belongs)) {
    steps.push(`tor: an updater, so only Tor's SOCKS port ${socksAt(socks)} is reachable, loopback services included`);
    // A gateway on another host is network: system domains and lockdown come first, whatever the destination.
    if (!socksLoopback && sdMember) {
      steps.push(`system domain "${sdMember.name}": the SOCKS gateway is network, and members have none`);
      return decide('deny', 'system-domain', `sd/${sdMember.name}`, sdMember.at, sdMember.why);
    }
    if (!socksLoopback && options.lockdown) {
      steps.push('lockdown: on — the SOCKS gateway is network');
      return decide('deny', 'lockdown', 'lockdown', undefined);
    }
    if (query.port === undefined && toSocks) notes.push(`only port ${socks.port}/tcp is reachable`);
    if (!toSocks) return decide('deny', 'tor', 'tor/updaters', policy.tor.at);
    // A gateway on another host is network: from a delegated cgroup, the user's or group's own app must let it out too.
    const delegated = !socksLoopback && delegatedMember(policy, policy.tor.updaters, query.who, facts);
    const root = delegated ? firstByDispatchOrder(policy, query.who, facts, false) : undefined;
    if (delegated && root) {
      steps.push(`${delegated}, so what the updaters let out, app "${root.name}" of its user or group must let out too`);
      return appDecision(root);
    }
    return decide('allow', 'tor', 'tor/socks', policy.tor.at);
  }

  // The table treats Tor's SOCKS port on loopback as network for all but the updaters (compile.ts, chain loopback).
  const socksAsNetwork = policy.tor.enabled && socksLoopback && query.port === socks.port && (query.proto ?? 'tcp') === 'tcp';
  if (target.loopback && !socksAsNetwork) {
    // A resolver on loopback would ask upstream for a system domain's member: the table judges DNS there by the members' dispatch.
    const dnsPort = query.port !== undefined && DNS_PORTS.includes(query.port) && (query.proto ?? 'tcp') !== 'icmp';
    if (sdMember && dnsPort) {
      steps.push(`loopback: port ${query.port} is DNS, and system domain "${sdMember.name}" has none: a local resolver would ask for it`);
      return decide('deny', 'system-domain', `sd/${sdMember.name}`, sdMember.at, sdMember.why);
    }
    steps.push('loopback: always allowed');
    if (sdMember && query.port === undefined)
      notes.push(`but DNS (ports ${DNS_PORTS.join(' and ')}) is not: system domain "${sdMember.name}" has none, and a resolver on loopback would ask for it`);
    if (policy.tor.enabled && socksLoopback && query.port === undefined && (query.proto ?? 'tcp') === 'tcp')
      notes.push(`port ${socks.port}/tcp, Tor's SOCKS port, is network: the levels below decide it, as for any address Tor would reach`);
    return decide('allow', 'loopback', 'loopback', undefined);
  }
  if (target.loopback) steps.push(`loopback: port ${socks.port}/tcp is Tor's SOCKS port, a way onto the network, so the levels below decide it`);

  if (sdMember) {
    steps.push(`system domain "${sdMember.name}": a member, so no network at all`);
    return decide('deny', 'system-domain', `sd/${sdMember.name}`, sdMember.at, sdMember.why);
  }
  steps.push('system domains: not a member');

  if (options.lockdown) {
    if (torUser) {
      steps.push("lockdown: on, but Tor's own traffic may still leave");
      return decide('allow', 'lockdown', 'lockdown', undefined);
    }
    steps.push('lockdown: on — all egress except loopback is denied');
    return decide('deny', 'lockdown', 'lockdown', undefined);
  }

  if (torUser) {
    steps.push("tor: Tor's own user may reach the network");
    return decide('allow', 'tor', 'tor/own', policy.tor.at);
  }
  if (policy.tor.enabled) steps.push('tor: not an updater');

  const dns = dnsDecision(policy, query, facts, steps, notes);
  if (dns) return decide(dns.verdict, 'dns', dns.ruleId, undefined);

  const app = firstByDispatchOrder(policy, query.who, facts, true);
  if (!app) {
    steps.push('apps: no app policy for this identity');
    return globalDeny() ?? (steps.push(`default: ${policy.defaults.egress}`), decide(policy.defaults.egress, 'default', 'default', policy.defaults.at));
  }
  const decided = appDecision(app);
  // Deny wins over a cgroup its user controls: what its app lets out, the user's or group's own app must let out too.
  const delegated = decided.verdict === 'allow' && delegatedMember(policy, app.identities, query.who, facts);
  const root = delegated ? firstByDispatchOrder(policy, query.who, facts, false) : undefined;
  if (delegated && query.who.kind === 'cgroup' && query.who.user === undefined && query.who.group === undefined)
    notes.push(`${delegated}: its process's user's or group's app must let this out too; give --as user:NAME to see`);
  if (!delegated || !root) return decided;
  steps.push(`${delegated}, so what app "${app.name}" lets out, app "${root.name}" of its user or group must let out too`);
  return appDecision(root);
}

/**
 * Where explain's walk puts an asker before it looks at any destination:
 * which precedence levels hold it, and which app's chain decides for it.
 * The resolver's decisions (src/resolver/decide.ts) take this, so that
 * they and explain find the same identity the same way.
 */
export interface AskerPlace {
  /** An updater over Tor: it reaches only Tor's SOCKS port. */
  readonly torUpdater: boolean;
  /** The system domain it is a member of. */
  readonly systemDomain: Policy['systemDomains'][number] | undefined;
  /** Tor's own user: it may reach the network. */
  readonly torUser: boolean;
  /** The app whose chain decides, as the kernel's dispatch finds it. */
  readonly app: Policy['apps'][number] | undefined;
  /** Where `app` claims a delegated cgroup: the app of its user or group, which must let out what `app` lets out too. */
  readonly root: Policy['apps'][number] | undefined;
}

export function placeAsker(policy: Policy, who: Who, facts: ExplainFacts): AskerPlace | { error: string } {
  const belongs = membership(policy, who, facts);
  if ('error' in belongs) return belongs;
  const app = firstByDispatchOrder(policy, who, facts, true);
  const delegated = app && delegatedMember(policy, app.identities, who, facts);
  return {
    torUpdater: policy.tor.enabled && policy.tor.updaters.some(belongs),
    systemDomain: policy.systemDomains.find((domain) => domain.members.some(belongs)),
    torUser: policy.tor.enabled && isTorUser(policy, who, facts),
    app,
    root: delegated ? firstByDispatchOrder(policy, who, facts, false) : undefined,
  };
}

/**
 * DNS, DNS-over-TLS and DNS-over-QUIC off the host (compile.ts, dnsRules):
 * the resolver's marked packets pass; with `dns.exclusive` everyone else's
 * are dropped, whatever their app or the default says.
 */
function dnsDecision(
  policy: Policy,
  query: ExplainQuery,
  facts: ExplainFacts,
  steps: string[],
  notes: string[],
): { verdict: 'allow' | 'deny'; ruleId: string } | undefined {
  const { dns } = policy;
  const proto = query.proto ?? (query.port !== undefined ? 'tcp' : undefined);
  const ports = DNS_PORTS.join(' and ');
  // The mark and root's socket, as the resolver's are: CAP_NET_RAW alone lets a socket carry any mark (Linux 5.17), and a tool with it keeps its user's uid.
  const user = whoUser(query.who);
  const marked = query.mark !== undefined && query.mark >>> 0 === dns.mark && user !== undefined && (user === 'root' || idOf(user, facts.users) === 0);
  if (query.mark !== undefined && query.mark >>> 0 === dns.mark && !marked)
    notes.push(`the resolver's mark passes only on root's sockets (egressd's resolver runs as root); give --app user:root to see them`);
  if (proto === 'icmp') return undefined;
  if (query.port === undefined || proto === undefined) {
    if (dns.exclusive && !marked)
      notes.push(`${DNS_EXCLUSIVE_RULE} (deny) applies to udp and tcp ports ${ports}: only the resolver's own packets leave to them`);
    return undefined;
  }
  if (!DNS_PORTS.includes(query.port)) return undefined;
  if (marked) {
    steps.push(
      `dns: port ${query.port}/${proto} from root with the resolver's mark 0x${dns.mark.toString(16)}: the resolver's own queries leave, whatever the rules below say`,
    );
    return { verdict: 'allow', ruleId: DNS_RESOLVER_RULE };
  }
  if (dns.exclusive) {
    steps.push(`dns: port ${query.port}/${proto} is DNS, DNS-over-TLS or DNS-over-QUIC, which only the resolver sends off this machine (dns.exclusive)`);
    return { verdict: 'deny', ruleId: DNS_EXCLUSIVE_RULE };
  }
  steps.push(`dns: port ${query.port}/${proto} is DNS, but dns.exclusive is off: the rules below decide`);
  return undefined;
}

/** What an allow answer for IPv6 does not cover. */
export const ROUTING_HEADER_NOTE =
  'an IPv6 packet carrying a routing header (any type but 2, Mobile IPv6) is dropped whatever its destination: the header can carry destinations the rules never see';

interface Target {
  readonly name: string | undefined;
  readonly ip: string | undefined;
  readonly family: 4 | 6 | undefined;
  readonly loopback: boolean;
  /** Says how the address asked for became `ip`, when it did. */
  readonly note: string | undefined;
  /** For an address: the chains of names the resolver learned it from. */
  readonly learned?: readonly (readonly string[])[];
}

/**
 * The destination as the kernel sees it. A dual-stack socket sends to an
 * IPv4-mapped address (::ffff:192.0.2.5) as IPv4 to 192.0.2.5, so rules for
 * IPv4 decide it and rules for IPv6 never see it. Loopback is what leaves
 * through lo: 127.0.0.0/8 and ::1, and the unspecified addresses 0.0.0.0 and
 * ::, which Linux connects to 127.0.0.1 and ::1. Any other address is taken to leave
 * through the network, although one of this machine's own addresses leaves
 * through lo too (explain does not look at the interfaces; --help says so).
 * A name is asked in the form the policy keeps it, the form resolvers are
 * asked for: an IDN as its ASCII form. What libc takes as an IPv4 address
 * (0x0a.0.0.1, 10.1) is that address, as it is for the program connecting.
 */
function classifyHost(host: string): Target | { error: string } {
  const written = host.replace(/^\[|\]$/g, '');
  const aton = isIP(written) === 0 ? inetAton(written) : undefined;
  const bare = aton ?? written;
  const family = isIP(bare);
  if (family === 0) {
    const lower = host.toLowerCase().replace(/\.$/, '');
    const ascii = asciiName(lower);
    if (ascii === undefined) return { error: `"${clip(host)}" is not a valid internationalised (IDNA) name` };
    const name = ascii.replace(/\.$/, '');
    // UTS-46 maps full-width digits and dots, so a non-ASCII name can come out as an address.
    if (name !== lower && (isIP(name) !== 0 || inetAton(name) !== undefined)) return classifyHost(name);
    const note = name === lower ? undefined : `${lower} is asked for as ${name}, its IDNA ASCII form`;
    return { name, ip: undefined, family: undefined, loopback: name === 'localhost' || name.endsWith('.localhost'), note };
  }
  const groups = addressGroups(family === 4 ? 4 : 6, bare);
  const mapped = family === 6 && groups.slice(0, 6).join() === '0,0,0,0,0,65535';
  let ip: string;
  let note: string | undefined;
  if (family === 4 || mapped) {
    const [high = 0, low = 0] = groups.slice(-2);
    ip = `${high >> 8}.${high & 255}.${low >> 8}.${low & 255}`;
    if (mapped) note = `${bare.toLowerCase()} is IPv4-mapped: a dual-stack socket sends to it as IPv4 to ${ip}, so rules for IPv4 decide it`;
  } else {
    ip = canonicalAddress(6, bare);
  }
  if (aton !== undefined) note = `libc reads ${written.toLowerCase()} as the IPv4 address ${aton}, so a program connecting to it connects to ${aton}`;
  const unspecified = ip === '0.0.0.0' || ip === '::';
  if (unspecified) {
    ip = ip === '::' ? '::1' : '127.0.0.1';
    note = `a connection to ${bare.toLowerCase()} goes to this machine, to ${ip}`;
  }
  const v4 = family === 4 || mapped;
  return { name: undefined, ip, family: v4 ? 4 : 6, loopback: v4 ? ip.startsWith('127.') : ip === '::1', note };
}

/** Says why a rule matches, or returns undefined. Name rules match names; network rules match addresses. */
function ruleMatches(policy: Policy, rule: Rule, target: Target, query: ExplainQuery, notes: string[]): string | undefined {
  const proto = query.proto ?? (query.port !== undefined ? 'tcp' : undefined);
  if ((rule.protocols && proto === undefined) || (rule.ports && query.port === undefined)) {
    // The answer depends on what was not asked; say so rather than guess.
    const wanted = [rule.protocols?.join('/'), rule.ports?.map((p) => (p.from === p.to ? p.from : `${p.from}-${p.to}`)).join(',')]
      .filter(Boolean)
      .join(' port ');
    if (destinationMatches(policy, rule, target)) notes.push(`${rule.id} (${rule.verdict}) applies to ${wanted} only; give --to HOST:PORT/PROTO to see it`);
    return undefined;
  }
  if (rule.protocols && !rule.protocols.includes(proto!)) return undefined;
  if (rule.ports && !rule.ports.some((range) => query.port! >= range.from && query.port! <= range.to)) return undefined;
  return destinationMatches(policy, rule, target, notes);
}

/** Says why a rule's destinations cover the target, or returns undefined. */
function destinationMatches(policy: Policy, rule: Rule, target: Target, notes?: string[]): string | undefined {
  if (rule.to.any) return 'any destination';
  if (target.ip !== undefined) {
    const net = rule.to.networks.find((candidate) => networkContains(candidate, target.family!, target.ip!));
    if (net) return `${target.ip} is in ${net.address}/${net.prefix}`;
    if (rule.to.names.length + rule.to.suffixes.length + rule.to.lists.length === 0) return undefined;
    const covered = (target.learned ?? []).map((chain) => {
      for (const name of chain) {
        const why = nameMatches(policy, rule, name);
        if (why !== undefined) return { chain, why };
      }
      return { chain, why: undefined };
    });
    const by = covered.find((c) => c.why !== undefined);
    const other = covered.find((c) => c.why === undefined);
    if (by && !(rule.sharedAddresses === 'spare' && other))
      return `${target.ip} was learned from ${by.chain.join(' > ')} (${by.why}): the resolver put it in this rule's set`;
    if (by && other)
      notes?.push(`${rule.id} spares ${target.ip}: it also answers ${other.chain.join(' > ')}, which the rule does not deny (sharedAddresses: spare)`);
    else notes?.push(`${rule.id} also matches ${target.ip} while it is a recent DNS answer for one of the rule's names`);
    return undefined;
  }
  const name = target.name!;
  return nameMatches(policy, rule, name, notes);
}

/** The suffix of `suffixes` covering `name` (the name itself or a parent), the first in the list's order, or undefined. */
function coveringSuffix(suffixes: NameTable, name: string): string | undefined {
  let first = -1;
  for (let at = 0; at >= 0; at = name.indexOf('.', at) + 1 || -1) {
    const index = suffixes.indexOf(name, at);
    if (index >= 0 && (first < 0 || index < first)) first = index;
  }
  return first < 0 ? undefined : suffixes.at(first);
}

/** Says why a rule's names cover `name`, or returns undefined. */
function nameMatches(policy: Policy, rule: Rule, name: string, notes?: string[]): string | undefined {
  const exact = rule.to.names.includes(name);
  if (exact) return `${name} is listed${rule.to.catalogueEntries.length ? ` (catalogue: ${catalogueFor(policy, rule, name)})` : ''}`;
  const suffix = rule.to.suffixes.find((s) => name === s || name.endsWith(`.${s}`));
  if (suffix) return `${name} is under *.${suffix}`;
  for (const listName of rule.to.lists) {
    const list = policy.lists.get(listName);
    if (!list) continue;
    if (list.names.has(name)) return `${name} is in list @${listName}`;
    const listSuffix = coveringSuffix(list.suffixes, name);
    if (listSuffix) return `${name} is under *.${listSuffix} in list @${listName}`;
  }
  if (rule.to.networks.length > 0) notes?.push(`${rule.id} would also match if ${name} resolves into one of its networks`);
  return undefined;
}

/**
 * When several apps claim the asker, the kernel's dispatch decides: deeper
 * cgroups first, then uid, then gid; in the uid map, uids identities name
 * before subordinate uids before members of groups and their subordinate
 * uids; in the gid map, gids before subordinate gids before members'
 * subordinate gids (compile's `claimLater`); among equals, the app
 * written first. Without `cgroups`, by uid and gid only: the root-set
 * identities a delegated cgroup's verdict goes on to.
 */
function firstByDispatchOrder(policy: Policy, who: Who, facts: ExplainFacts, cgroups: boolean): Policy['apps'][number] | undefined {
  let best: { app: Policy['apps'][number]; rank: number } | undefined;
  for (const app of policy.apps) {
    for (const identity of app.identities) {
      for (const selector of identity.selectors) {
        if (!cgroups && selector.kind === 'cgroup') continue;
        const r = selectorClaims(policy, selector, who, facts);
        if (r === undefined) continue;
        if (!best || r < best.rank) best = { app, rank: r };
      }
    }
  }
  return best?.app;
}

/** Where in the dispatch a selector claims the asker (lower first), or undefined. */
function selectorClaims(policy: Policy, selector: Selector, who: Who, facts: ExplainFacts): number | undefined {
  if (who.kind !== 'name') return selectorRank(selector, who, facts);
  const app = policy.apps.find((candidate) => candidate.name === who.name);
  const named = app ? app.identities : [policy.identities.get(who.name)].filter((i): i is Identity => i !== undefined);
  const probe: Identity = { name: '', selectors: [selector], at: { file: '', line: 0, col: 0 } };
  if (!named.some((mine) => identitiesOverlap(probe, mine))) return undefined;
  return selector.kind === 'cgroup' ? 1000 - selector.level : selector.kind === 'user' ? RANK.uid : RANK.gid;
}

function catalogueFor(policy: Policy, rule: Rule, name: string): string {
  return rule.to.catalogueEntries.filter((id) => policy.catalogue.get(id)?.names.includes(name)).join(', ');
}

function membership(policy: Policy, who: Who, facts: ExplainFacts): ((identity: Identity) => boolean) | { error: string } {
  if (who.kind === 'name') {
    const app = policy.apps.find((candidate) => candidate.name === who.name);
    const named = app ? app.identities : policy.identities.has(who.name) ? [policy.identities.get(who.name)!] : undefined;
    if (!named) {
      const known = [...policy.apps.map((a) => a.name), ...policy.identities.keys()];
      return {
        error: `no app or identity named "${who.name}"${known.length ? ` (known: ${[...new Set(known)].join(', ')})` : ''}; or give user:NAME, uid:N, group:NAME, gid:N, unit:NAME.service or cgroup:PATH`,
      };
    }
    return (identity) => named.some((mine) => identitiesOverlap(identity, mine));
  }
  return (identity) => identity.selectors.some((selector) => selectorRank(selector, who, facts) !== undefined);
}

/** Where the kernel's dispatch finds an id, in the order of its maps (cgroups rank below 1000). */
const RANK = { uid: 2000, subordinateUid: 2100, memberUid: 2200, gid: 3000, subordinateGid: 3100, memberGid: 3200 } as const;

/**
 * Whether the selector holds the asker as the kernel sees it, and where in
 * the dispatch: a user holds its uid and its subordinate uids and gids; a
 * group holds its gid and its members' uids (primary or supplementary),
 * whatever group they send with, and their subordinate uids and gids, at
 * the members' rank. A cgroup asker may come with its process's user and
 * group (`--as`).
 */
function selectorRank(selector: Selector, who: Who, facts: ExplainFacts): number | undefined {
  const user = whoUser(who);
  const group = who.kind === 'group' ? who.group : who.kind === 'cgroup' ? who.group : undefined;
  const uid = user === undefined ? undefined : idOf(user, facts.users);
  const gid = group === undefined ? undefined : idOf(group, facts.groups);
  if (selector.kind === 'user') {
    if (user !== undefined && sameId(selector.user, user, facts.users)) return RANK.uid;
    const own = subordinateOf(idOf(selector.user, facts.users), facts);
    if (inRanges(uid, own?.uids)) return RANK.subordinateUid;
    if (inRanges(gid, own?.gids)) return RANK.subordinateGid;
    return undefined;
  }
  if (selector.kind === 'group') {
    const own = idOf(selector.group, facts.groups);
    const found = own === undefined ? undefined : facts.members?.get(own);
    const members = found === undefined || 'error' in found ? [] : found;
    const theirs = members.flatMap((member) => subordinateOf(member, facts) ?? []);
    if (uid !== undefined && (members.includes(uid) || theirs.some((ranges) => inRanges(uid, ranges.uids)))) return RANK.memberUid;
    if (group !== undefined && sameId(selector.group, group, facts.groups)) return RANK.gid;
    if (theirs.some((ranges) => inRanges(gid, ranges.gids))) return RANK.memberGid;
    return undefined;
  }
  if (who.kind === 'cgroup') return cgroupAncestorMatching(who.path, selector) !== undefined ? 1000 - selector.level : undefined;
  return undefined;
}

/**
 * Whether a user or group selector holds a process that may send with any of
 * these uids and gids, as the table's dispatch decides it (`selectorRank`):
 * its own id, a user's subordinate ranges, a group's members by uid and
 * their subordinate ranges.
 */
export function selectorHoldsIds(
  selector: Extract<Selector, { kind: 'user' | 'group' }>,
  ids: { readonly uids: readonly number[]; readonly gids: readonly number[] },
  facts: Pick<ExplainFacts, 'users' | 'groups' | 'subordinate' | 'members'>,
): boolean {
  return (
    ids.uids.some((uid) => selectorRank(selector, { kind: 'user', user: uid }, facts) !== undefined) ||
    ids.gids.some((gid) => selectorRank(selector, { kind: 'group', group: gid }, facts) !== undefined)
  );
}

function idOf(value: string | number, ids: ExplainFacts['users']): number | undefined {
  const id = typeof value === 'number' ? value : ids.get(value);
  return typeof id === 'number' ? id : undefined;
}

function subordinateOf(uid: number | undefined, facts: Pick<ExplainFacts, 'subordinate'>): SubordinateIds | undefined {
  const ranges = uid === undefined ? undefined : facts.subordinate?.get(uid);
  return ranges && !('error' in ranges) ? ranges : undefined;
}

function inRanges(id: number | undefined, ranges: readonly IdRange[] | undefined): boolean {
  return id !== undefined && (ranges ?? []).some((range) => id >= range.from && id <= range.to);
}

/**
 * Says why the asker's cgroup is one a non-root user controls, when the
 * deepest cgroup of `identities` it matches is (the map element the kernel
 * finds); undefined otherwise. Only then is it held to the root-set
 * identities as well, and only where the policy has some (as compile).
 */
function delegatedMember(policy: Policy, identities: readonly Identity[], who: Who, facts: ExplainFacts): string | undefined {
  if (who.kind !== 'cgroup') return undefined;
  if (!policy.apps.some((app) => app.identities.some((i) => i.selectors.some((s) => s.kind === 'user' || s.kind === 'group')))) return undefined;
  let deepest: { level: number; path: string } | undefined;
  for (const selector of identities.flatMap((i) => i.selectors)) {
    if (selector.kind !== 'cgroup' || (deepest && deepest.level >= selector.level)) continue;
    const path = cgroupAncestorMatching(who.path, selector);
    if (path !== undefined) deepest = { level: selector.level, path };
  }
  const owner = deepest && facts.cgroupOwners?.get(deepest.path);
  return owner === undefined ? undefined : `cgroup ${deepest!.path} is owned by uid ${owner} (delegated)`;
}

function whoUser(who: Who): string | number | undefined {
  return who.kind === 'user' ? who.user : who.kind === 'cgroup' ? who.user : undefined;
}

function sameId(a: string | number, b: string | number, ids: ExplainFacts['users']): boolean {
  const numeric = (value: string | number): number | string => {
    const id = typeof value === 'number' ? value : ids.get(value);
    return typeof id === 'number' ? id : value;
  };
  return numeric(a) === numeric(b);
}

function isTorUser(policy: Policy, who: Who, facts: ExplainFacts): boolean {
  const user = whoUser(who);
  return user !== undefined && sameId(policy.tor.user, user, facts.users);
}

/** An address in the form the policy holds (RFC 5952 for IPv6), so that equal addresses compare equal. */
function canonicalAddress(family: 4 | 6, address: string): string {
  const parsed = parseNetwork(address);
  if (!parsed.ok || parsed.value.family !== family) throw new Error(`internal: ${address} is not an IPv${family} address`);
  return parsed.value.address;
}

function socksAt(socks: Policy['tor']['socks']): string {
  return socks.family === 6 ? `[${socks.address}]:${socks.port}` : `${socks.address}:${socks.port}`;
}
