import { createHash } from 'node:crypto';
import { DNS_PORTS, type App, type Identity, type NameList, type Network, type Origin, type Policy, type PortRange, type Rule } from '../policy/model.js';
import { EgressError, ErrorCode } from '../errors.js';
import { formatIssue, sortIssues, type PolicyIssue } from '../policy/issues.js';
import {
  dispatch,
  EGRESSD_TABLE,
  match,
  rule,
  safeComment,
  safeText,
  stmt,
  verdict,
  type ChainDecl,
  type Element,
  type RuleDecl,
  type Ruleset,
  type SetDecl,
  type SetFlag,
  type SetKey,
  type Statement,
  type Verdict,
} from './ruleset.js';
import { appTags, CT_MARK_KEEP, CT_MARK_MASK, DEFAULT_TAG, markBits, markValue, UNCLAIMED_TAG } from './ct-mark.js';
import { cgroupGlobMatcher } from './glob.js';
import { logPrefix } from './log-prefix.js';
import {
  appsWithOwnGlobalDeny,
  DNS_EXCLUSIVE_RULE,
  DNS_RESOLVER_RULE,
  entryKey,
  keyOfEntry,
  ruleIdTable,
  socksOnLoopback,
  SYN_COOKIES_RULE,
  synCookieGuard,
  TOR_SOCKS_ANSWER_RULE,
  type RuleIdEntry,
} from './rule-ids.js';

export const TABLE = EGRESSD_TABLE;

/** A user or group name as the caller found it through NSS: its id, or why the lookup failed. */
export type IdLookup = number | { readonly error: string };

/**
 * What the compiler needs to know about the machine, gathered by the caller
 * (I/O lives outside the compiler): the ids of the user and group names the
 * policy mentions (`factsNeeded`), and the cgroups that exist now so their
 * members are in the table from the first packet on.
 */
export interface Facts {
  /** Each user name looked up through NSS; a name that is not here does not exist on this machine. */
  readonly users: ReadonlyMap<string, IdLookup>;
  readonly groups: ReadonlyMap<string, IdLookup>;
  /** Existing cgroup paths relative to the cgroup2 root, e.g. "system.slice/cups.service". */
  readonly cgroups: readonly string[];
  /** Existing cgroups whose path nft cannot name (not UTF-8, say); any that `cgroups` holds are found there too. */
  readonly unnamedCgroups?: readonly UnnamedCgroup[];
  /**
   * The cgroups of `cgroups` whose directory a non-root uid owns, with that
   * uid: systemd delegated them (`user@UID.service` and what its user makes
   * below it). Their user can move its processes into them. Absent: root's.
   */
  readonly cgroupOwners?: ReadonlyMap<string, number>;
  /**
   * For each user the policy names, and each member of a group it names,
   * by uid: its subordinate uid and gid ranges (/etc/subuid, /etc/subgid),
   * or why they could not be read. A uid that is not here has none.
   */
  readonly subordinate?: ReadonlyMap<number, SubordinateIds | { readonly error: string }>;
  /**
   * For each group the policy names, by gid: the uids of its members — its
   * member list and the users whose primary group it is — or why they could
   * not be listed. A gid that is not here has none.
   */
  readonly members?: ReadonlyMap<number, readonly number[] | { readonly error: string }>;
  /** Why primary members may be missing from `members` (a name service that may not list its users), for a warning; undefined when every source lists them. */
  readonly membersIncomplete?: string;
  /** What reading the facts warned about (a bad line of /etc/subuid), at its file:line. */
  readonly warnings?: readonly PolicyIssue[];
  /** `net.ipv4.tcp_syncookies` where the table is applied, read when `FactsNeeded.tcpSyncookies` asks; 2 sends every SYN-ACK with a cookie. */
  readonly tcpSyncookies?: number;
}

/** Ids from `from` to `to`, both included. */
export interface IdRange {
  readonly from: number;
  readonly to: number;
}

/** A user's subordinate ids: what `newuidmap` and `newgidmap` let it map into a user namespace, and send from there. */
export interface SubordinateIds {
  readonly uids: readonly IdRange[];
  readonly gids: readonly IdRange[];
}

/** A cgroup whose path nft cannot carry in a string: its name is not UTF-8, or holds a quote or a control character. */
export interface UnnamedCgroup {
  /** The path as globs see it: bytes that are not UTF-8 read as U+FFFD. */
  readonly path: string;
  /** The path for people, quoted, such bytes as \xNN. */
  readonly shown: string;
  /** Its nearest ancestor nft can name; '' for none. */
  readonly namedAncestor: string;
}

/**
 * Whether nft can carry a cgroup path in a string. A non-root user names
 * the cgroups of its own subtree, with any bytes: one the table named
 * anyway would make nft refuse every apply.
 */
export function nftCanName(path: string): boolean {
  // eslint-disable-next-line no-control-regex -- control characters are what nft strings cannot carry
  return !/["\u0000-\u001f]/.test(path);
}

/** What the caller looks up before compiling: NSS cannot list every user cheaply, so only the names the policy mentions. */
export interface FactsNeeded {
  readonly users: readonly string[];
  readonly groups: readonly string[];
  /** Users and groups the policy names by number: they need no lookup, but their subordinate ranges and members are facts too. */
  readonly userIds?: readonly number[];
  readonly groupIds?: readonly number[];
  readonly cgroupDepth: number;
  /** The table drops SYN-ACKs sent from no socket (synCookieGuard): whether the kernel sends every one so is a fact too. */
  readonly tcpSyncookies?: true;
}

export interface CompileOptions {
  /** The kill switch: everything but loopback (and Tor itself when updates over Tor are on) is denied. */
  readonly lockdown?: boolean;
}

/** A rule whose destinations include names: the resolver fills its sets with the answers' addresses. */
export interface DnsBinding {
  readonly ruleId: string;
  readonly verdict: 'allow' | 'deny';
  readonly names: readonly string[];
  readonly suffixes: readonly string[];
  readonly lists: readonly string[];
  readonly set4: string;
  readonly set6: string;
  /** Deny bindings: whether a learned address that also answers a name this rule does not deny is denied ('deny') or spared (Rule.sharedAddresses; src/resolver/fill.ts). */
  readonly sharedAddresses?: 'deny' | 'spare';
}

/** Tells the app tracker which map a cgroup matching `glob` joins, with which verdict: by the new cgroup's owner. */
export interface CgroupBinding {
  readonly owner: string;
  readonly glob: string;
  readonly level: number;
  readonly map: string;
  /** For a cgroup root owns. */
  readonly verdict: Verdict;
  /**
   * For a cgroup a non-root uid owns (`Facts.cgroupOwners`): the owner's
   * decision, whose every accept still meets the uid and gid identities.
   * Its chain is in every table whose policy can need it, whether or not a
   * member was delegated when it was compiled: the tracker adds a new
   * delegated cgroup at once, with no re-apply.
   */
  readonly delegatedVerdict: Verdict;
  /**
   * Only for an identity that denies (a system domain, the updaters over
   * Tor, a default-deny app): the verdict a member's nearest ancestor nft
   * can name is cut off with when the member's own name cannot be carried
   * (as compile cuts off, `Compiler.claim`). Absent: such a member is left
   * out — or none can be: no glob of the identity has a wildcard.
   */
  readonly cutOff?: Verdict;
}

export interface Compiled {
  readonly ruleset: Ruleset;
  readonly dnsBindings: readonly DnsBinding[];
  readonly cgroupBindings: readonly CgroupBinding[];
  /**
   * What makes this ruleset unfit to apply on this machine: a system domain
   * member or Tor's user that does not exist (the table would let it out),
   * or a name that could not be looked up. Whoever applies refuses a
   * non-empty list (`refuseCompileErrors`); `check` and `compile` print it.
   */
  readonly errors: readonly PolicyIssue[];
  /** Some of `errors` are names whose lookup failed (the name service, not the policy): EGD_NAME_LOOKUP, exit 3. */
  readonly lookupFailed: boolean;
  readonly warnings: readonly PolicyIssue[];
  /** Every deciding rule's short id (rule-ids.ts), as log prefixes and comments carry it: the table a prefix or counter maps back through. */
  readonly ruleIds: readonly RuleIdEntry[];
}

/**
 * Throws, every error as file:line:col, when the compiled ruleset must not be
 * applied: EGD_NAME_LOOKUP when a name service failed, else EGD_POLICY_INVALID.
 */
export function refuseCompileErrors(compiled: Compiled, dir: string): void {
  if (compiled.errors.length === 0) return;
  const details = sortIssues([...compiled.errors, ...compiled.warnings]).map((issue) => formatIssue(issue, dir));
  const count = compiled.errors.length;
  const what = compiled.lookupFailed
    ? 'a user or group name could not be looked up'
    : `${count} ${count === 1 ? 'error' : 'errors'} in the policy on this machine`;
  throw new EgressError(compiled.lookupFailed ? ErrorCode.NameLookup : ErrorCode.PolicyInvalid, `${dir}: ${what}; nothing was changed`, { details });
}

/** The deepest cgroup level any selector needs: how far down the cgroup tree facts must look. */
function cgroupDepth(policy: Policy): number {
  const identities = everyIdentity(policy);
  return Math.max(0, ...identities.flatMap((i) => i.selectors.map((s) => (s.kind === 'cgroup' ? s.level : 0))));
}

/** The user and group names to look up (numeric ids need none) and the cgroup depth, for `Facts`. */
export function factsNeeded(policy: Policy): FactsNeeded {
  const users = new Set<string>();
  const groups = new Set<string>();
  const userIds = new Set<number>();
  const groupIds = new Set<number>();
  for (const selector of everyIdentity(policy).flatMap((i) => i.selectors)) {
    if (selector.kind === 'user') {
      if (typeof selector.user === 'string') users.add(selector.user);
      else userIds.add(selector.user);
    }
    if (selector.kind === 'group') {
      if (typeof selector.group === 'string') groups.add(selector.group);
      else groupIds.add(selector.group);
    }
  }
  if (policy.tor.enabled && typeof policy.tor.user === 'string') users.add(policy.tor.user);
  const byNumber = (a: number, b: number): number => a - b;
  return {
    users: [...users].sort(),
    groups: [...groups].sort(),
    userIds: [...userIds].sort(byNumber),
    groupIds: [...groupIds].sort(byNumber),
    cgroupDepth: cgroupDepth(policy),
    ...(synCookieGuard(policy) ? { tcpSyncookies: true as const } : {}),
  };
}

function everyIdentity(policy: Policy): Identity[] {
  return [
    ...policy.identities.values(),
    ...policy.apps.flatMap((a) => a.identities),
    ...policy.systemDomains.flatMap((d) => d.members),
    ...policy.tor.updaters,
  ];
}

/** The chain a dispatch sends its delegated members to (`Compiler.delegatedChain`), and how to make it. */
interface Delegated {
  readonly chain: string;
  readonly make: () => Verdict;
}

/** The chain an identity that denies cuts off an unnameable member's ancestor with, and how to make it (`Compiler.claim`). */
interface Closed {
  readonly chain: string;
  readonly make: () => Verdict;
}

/**
 * Where a delegated member's accepts go when its chain marks no connections
 * (the updaters', or any in a table without conntrack): apps by uid, then by
 * gid, then accept. An app chain that marks gets `uc_root_<chain>` instead,
 * which ends by entering that app's own chain. Their lookups go to the
 * apps' own chains, never to a `uc_` one, so no path loops.
 */
const UC_ROOT_CHAIN = 'uc_root_ids';

/** One cgroup depth of a dispatch: its map's elements and verdicts, and which owner claimed each path. */
interface LevelEntries {
  readonly elements: Element[];
  readonly verdicts: Verdict[];
  readonly claimed: Map<string, string>;
}

/** uids or gids a dispatch has given out: single ids and ranges, each with its verdict and owner. */
interface IdClaims {
  readonly points: Map<number, { target: Verdict; owner: string }>;
  readonly ranges: { from: number; to: number; target: Verdict; owner: string }[];
  /**
   * Ids an identity holds through another name — a user's subordinate
   * ranges, a group's members and their subordinate ranges — claimed once
   * every identity has claimed the ids it names (`dispatchRules`), in the
   * order of `rank`, so that which identity keeps an id does not depend on
   * the order of the files.
   */
  readonly later: { rank: number; from: number; to: number; target: Verdict; owner: string; at: Origin; what: string }[];
}

/** Ranks of what `IdClaims.later` holds: a user's subordinate ids before the members of a group, whose own subordinate ids rank with them. */
const SUBORDINATE = 1;
const MEMBER = 2;

interface Dispatch {
  readonly prefix: string;
  readonly cgroupLevels: Map<number, LevelEntries>;
  readonly uids: IdClaims;
  readonly gids: IdClaims;
  /** Ancestors of member cgroups nft cannot name, to be cut off once every identity has claimed its own (`claim`). */
  readonly cutOffs: { level: number; path: string; closed: () => Verdict; owner: string; at: Origin; shown: string }[];
}

/**
 * Policy → one nftables table. Pure: the same policy, facts and options give
 * a byte-identical ruleset. Per-packet cost does not grow with the number of
 * names, addresses or apps: identities are found with verdict maps, addresses
 * with sets; each policy rule becomes at most four nft rules (static v4/v6
 * networks, resolved v4/v6 addresses).
 */
export function compile(policy: Policy, facts: Facts, options: CompileOptions = {}): Compiled {
  return new Compiler(policy, facts, options).run();
}

class Compiler {
  private readonly sets: SetDecl[] = [];
  private readonly meters = new Set<string>();
  /** Constant sets by name, with their elements (as JSON): rules share them. */
  private readonly constants = new Map<string, string>();
  private readonly chains: ChainDecl[] = [];
  private readonly dnsBindings: DnsBinding[] = [];
  /** Per app whose own rules allow something, the tag its connections carry and the chain that replays its rules for packets without an owner (ownerlessReplay). */
  private readonly replays: { readonly tag: number; readonly chain: string }[] = [];
  /** Bindings as claimed; `delegated` when the owner's delegated members get a chain of their own (`delegatedChain`). */
  private readonly cgroupBindings: (Omit<CgroupBinding, 'delegatedVerdict' | 'cutOff'> & { readonly delegated?: string; readonly closed?: string })[] = [];
  /** The root-identity chains delegated copies go on to, made once the apps' uid and gid maps exist, each with what decides where neither has the packet. */
  private readonly rootChains = new Map<string, Verdict>();
  /** Whether some app names a user or group: only then can a delegated member's verdict take something away (`UC_ROOT_CHAIN`). */
  private readonly rootIdentities: boolean;
  private readonly errors: PolicyIssue[] = [];
  private lookupFailed = false;
  private readonly warnings: PolicyIssue[] = [];
  private readonly log: Policy['defaults']['log'];
  private readonly ruleIds: readonly RuleIdEntry[];
  /** Short ids by entryKey: a rule's id, and for a global rule's copy the app it is copied for. */
  private readonly shortIds: ReadonlyMap<string, string>;
  /** The apps whose chain goes on to a copy of the global deny list (appsWithOwnGlobalDeny). */
  private readonly ownGlobalDeny: ReadonlySet<string>;
  /** Every cgroup the facts list, with whether nft can name it. */
  private readonly cgroups: readonly (UnnamedCgroup & { readonly nameable: boolean })[];
  /** The table uses conntrack (a default deny somewhere): only then are connections tagged with their identity (ct-mark.ts). */
  private readonly tracked: boolean;
  private readonly tags: ReadonlyMap<string, number>;

  constructor(
    private readonly policy: Policy,
    private readonly facts: Facts,
    private readonly options: CompileOptions,
  ) {
    this.log = policy.defaults.log;
    this.ruleIds = ruleIdTable(policy, options);
    this.shortIds = new Map(this.ruleIds.map((entry) => [keyOfEntry(entry), entry.id]));
    this.ownGlobalDeny = new Set(appsWithOwnGlobalDeny(policy).map((app) => app.name));
    this.rootIdentities = policy.apps.some((app) => app.identities.some((i) => i.selectors.some((s) => s.kind === 'user' || s.kind === 'group')));
    this.cgroups = [
      ...facts.cgroups.map((path) => {
        const segments = path.split('/');
        const lost = segments.findIndex((segment) => !nftCanName(segment));
        return { path, shown: JSON.stringify(path), namedAncestor: segments.slice(0, Math.max(lost, 0)).join('/'), nameable: lost < 0 };
      }),
      ...(facts.unnamedCgroups ?? []).map((cgroup) => ({ ...cgroup, nameable: false })),
    ];
    this.tracked = policy.defaults.egress === 'deny' || policy.apps.some((app) => app.defaultVerdict === 'deny');
    this.tags = this.tracked ? appTags(policy.apps.map((app) => app.name)) : new Map();
  }

  run(): Compiled {
    const { policy } = this;
    this.warnings.push(...(this.facts.warnings ?? []));
    // Tor's user may reach the network; a missing one is an error unless the policy says it may be missing.
    const torAt = policy.tor.userAt ?? policy.tor.at;
    const torUid =
      policy.tor.enabled && torAt
        ? this.idOf('user', policy.tor.user, torAt, `Tor's user ${JSON.stringify(policy.tor.user)}`, !policy.tor.userOptional)
        : undefined;

    // System domains: no network at all. Their dispatch comes right after loopback, so nothing below can open them up.
    const domains = this.newDispatch('sd');
    for (const domain of policy.systemDomains) {
      const chain = `sd_${domain.name}`;
      this.chains.push({ name: chain, rules: this.denyTail(`sd/${domain.name}`, domain.at, true) });
      // A member that matches nothing is not kept offline: that is an error, not a warning.
      // Its own chain lets nothing out, so a member's ancestor cut off with it gains nothing.
      for (const member of domain.members)
        this.claim(domains, member, verdict.goto(chain), `system domain ${domain.name}`, true, { chain, make: () => verdict.goto(chain) });
    }
    const systemDomainRules = this.dispatchRules(domains, 'system domains');

    const output: RuleDecl[] = [];
    output.push(...this.routingHeaderRules());
    // Updaters over Tor come first, before loopback: a local resolver or proxy
    // would otherwise look up or fetch for them, under its own identity.
    if (policy.tor.enabled) output.push(...this.torUpdaterRules(systemDomainRules, torUid));
    // This rule carries the policy digest: `status` and `plan` read it back from the live table.
    const loopback = `loopback; ${POLICY_MARK}${policy.digest.slice(0, 32)}`;
    const loopbackRules = this.loopbackExceptions(systemDomainRules);
    if (loopbackRules.length > 0) {
      this.chains.push({ name: 'loopback', rules: [...loopbackRules, rule([verdict.accept()], 'loopback')] });
      output.push(rule([match.oif('lo'), verdict.jump('loopback')], loopback));
    } else output.push(rule([match.oif('lo'), verdict.accept()], loopback));
    output.push(...systemDomainRules);
    output.push(...this.synCookieRules());

    // IPv6 cannot work without neighbour discovery and MLD, which the kernel
    // sends on nobody's behalf: from its own sockets, which have no file, so
    // `meta skuid` finds no owner. A process's raw socket has one: its
    // ND- or MLD-typed packets, which it may address anywhere, go on to the
    // identity rules below (lockdown, its app, the global deny, the default)
    // like any other packet of its. What passes here is the kernel's own ND
    // (hop limit 255), which it sends only to link-local, multicast and
    // on-link neighbours; and, outside lockdown, its MLD reports (hop limit
    // 1, to a multicast address), at a bounded rate: their group addresses
    // are chosen by whoever joins, a system domain's members included, so
    // they are a channel past every identity (measured: 54,000 joins in 3 s
    // made the kernel send 1.3 MB of reports). IGMP reports, IPv4's, are
    // bounded alike but then meet the rules below: IPv4 unicast needs none.
    // Under lockdown both meet the kill switch: the host's memberships lapse,
    // and a switch that snoops MLD may stop passing it multicast (neighbours
    // still reach it: they learn its link address from its own ND).
    // In chains of their own, entered by ICMPv6 and IGMP only: every other
    // packet pays one comparison for them instead of the rules' expressions
    // (~10 % of the table's cost per packet, perf on bench/packet-cost.ts).
    const link: RuleDecl[] = [
      rule([match.owned(), verdict.return()], 'ICMPv6 and IGMP of a process, raw sockets too: its identity decides'),
      rule(
        [match.hoplimit(255), match.icmpv6Type(['nd-router-solicit', 'nd-neighbor-solicit', 'nd-neighbor-advert']), verdict.accept()],
        "IPv6 neighbour discovery, the kernel's",
      ),
    ];
    if (this.options.lockdown) {
      output.push(rule([match.l4proto('ipv6-icmp'), verdict.jump('link_local')], "the kernel's neighbour discovery"));
    } else {
      link.push(
        rule(
          [
            match.hoplimit(1),
            match.daddrIn6Multicast(),
            match.icmpv6Type(['mld-listener-report', 'mld-listener-done', 'mld2-listener-report']),
            verdict.goto('mld_reports'),
          ],
          "IPv6 multicast listener reports, the kernel's",
        ),
        rule([match.l4proto('igmp'), verdict.goto('igmp_reports')], "IGMP reports, the kernel's"),
      );
      this.chains.push({ name: 'mld_reports', rules: [...this.reportLimit('MLD'), rule([verdict.accept()], 'MLD reports within their rate')] });
      this.chains.push({ name: 'igmp_reports', rules: this.reportLimit('IGMP') });
      output.push(rule([match.l4proto('@proto_igmp_ipv6_icmp'), verdict.jump('link_local')], "the kernel's neighbour discovery and multicast reports"));
    }
    this.chains.push({ name: 'link_local', rules: link });

    // The kill switch, when on: only Tor itself may still leave.
    if (this.options.lockdown) {
      if (torUid !== undefined) output.push(rule([match.skuid(torUid), stmt.counter(), verdict.accept()], this.tagged(undefined, 'lockdown', ': Tor itself')));
      this.chains.push({ name: 'lockdown', rules: this.denyTail('lockdown', undefined, true) });
      output.push(rule([verdict.goto('lockdown')], 'lockdown is on'));
    }

    // Tor itself may reach the network.
    if (torUid !== undefined)
      output.push(rule([match.skuid(torUid), stmt.counter(), verdict.accept()], this.tagged(policy.tor.at, 'tor/own', ": Tor's own traffic")));

    output.push(...this.dnsRules());

    // Per-app rules, then the global deny list, then the default.
    const apps = this.newDispatch('app');
    for (const app of policy.apps) {
      const chain = `app_${app.name}`;
      const rules = this.appChain(app);
      this.chains.push({ name: chain, rules });
      // An app's identity may be missing here (one policy for several machines): a warning naming it.
      // A default-deny app's cut-off ancestor gets its default only: its allowances are for its own members.
      const cut = `cut_app_${app.name}`;
      const closed = app.defaultVerdict === 'deny' ? { chain: cut, make: () => this.closedChain(cut, `app/${app.name}/default`, app.at) } : undefined;
      const name = `uc_app_${app.name}`;
      const delegated = this.rootIdentities ? { chain: name, make: () => this.delegatedChain(name, rules, chain) } : undefined;
      this.keepForTracker(app.identities, closed, delegated);
      for (const identity of app.identities) this.claim(apps, identity, verdict.goto(chain), `app ${app.name}`, false, closed, delegated);
    }
    output.push(...this.dispatchRules(apps, 'apps'));
    for (const [name, fallback] of this.rootChains) this.chains.push({ name, rules: this.rootIdentityRules(fallback) });

    if (this.replays.length > 0) {
      this.sets.push({
        name: OWNERLESS_MAP,
        key: 'mark',
        map: 'verdict',
        flags: [],
        elements: this.replays.map((r) => markBits(r.tag)),
        verdicts: this.replays.map((r) => verdict.jump(r.chain)),
      });
    }
    const globalDeny: RuleDecl[] = [];
    policy.globalDeny.forEach((r, index) => globalDeny.push(...this.ruleDecls(r, `g${index}`, { listed: true })));
    this.chains.push({ name: 'global_deny', rules: globalDeny });
    output.push(rule([verdict.jump('global_deny')], 'global deny list'));
    // The copies after the list itself, whose sets they look up.
    for (const app of this.ownGlobalDeny) {
      const copy: RuleDecl[] = [];
      policy.globalDeny.forEach((r, index) => copy.push(...this.ruleDecls(r, `g${index}`, { copyFor: app })));
      this.chains.push({ name: globalDenyChain(app), rules: copy });
    }

    output.push(...this.defaultTail('default', policy.defaults.egress, policy.defaults.at, DEFAULT_TAG));
    // The sets the DNS rules and the link-local chain are entered by, declared last: the policy's own sets come first.
    this.constantSet(DNS_PROTOCOLS_SET, 'inet_proto', ['tcp', 'udp']);
    this.constantSet(DNS_PORTS_SET, 'inet_service', DNS_PORTS);
    if (!this.options.lockdown) this.constantSet('proto_igmp_ipv6_icmp', 'inet_proto', ['igmp', 'ipv6-icmp']);

    const base: ChainDecl = { name: 'output', hook: { hook: 'output', prio: 0, policy: policy.defaults.egress === 'deny' ? 'drop' : 'accept' }, rules: output };
    const ruleset: Ruleset = { table: TABLE, sets: this.sets, chains: [base, ...this.chains].map(fingerprintRules) };
    assertUniqueNames(ruleset);
    const made = new Set(this.chains.map((c) => c.name));
    const madeFor = (chain: string) => {
      if (!made.has(chain)) throw new Error(`internal: a cgroup binding goes to chain ${chain}, which the table lacks`);
      return chain;
    };
    return {
      ruleset,
      dnsBindings: this.dnsBindings,
      cgroupBindings: this.cgroupBindings.map(({ delegated, closed, ...binding }) => ({
        ...binding,
        delegatedVerdict: delegated === undefined ? binding.verdict : verdict.goto(madeFor(delegated)),
        // Not made only where none of the identity's globs can match a name nft cannot carry (keepForTracker): a member
        // of a glob that can must find the chain, or the tracker would leave it out, to meet what follows.
        ...(closed === undefined || !(made.has(closed) || mayMatchUnnamed(binding.glob)) ? {} : { cutOff: verdict.goto(madeFor(closed)) }),
      })),
      errors: this.errors,
      lookupFailed: this.lookupFailed,
      warnings: this.warnings,
      ruleIds: this.ruleIds,
    };
  }

  /**
   * An IPv6 routing header carries the destinations after the first: the
   * output hook sees only the first as `ip6 daddr`. Any socket may set a
   * segment routing header (type 4, IPV6_RTHDR, no capability needed), and a
   * hop that processes SRv6 sends the packet on to the next segment — a
   * destination no rule was asked about. So every packet with a routing
   * header but type 2 (Mobile IPv6's, which names only the sender's own home
   * address) is dropped, whoever sends it.
   *
   * First in the chain, before the updaters' dispatch and loopback: an
   * updater's SOCKS gateway on another host is accepted on its address, and
   * a first segment that is this machine's own address leaves by lo — where
   * a machine that forwards with seg6_enabled sends it on to the next
   * segment through the forward hook, which this table does not see
   * (measured).
   *
   * Only a routing header right after the IPv6 header is looked for: the
   * one socket option that sets a routing header without CAP_NET_RAW
   * (IPV6_RTHDR) puts it there, and the options that could go before it
   * (hop-by-hop, destination options) need CAP_NET_RAW, which a confined
   * process must not hold (README, threat model). Tested first, the next
   * header is a payload load: walking the extension headers for every IPv6
   * packet (`rt type` alone) cost the table a fifth more CPU per new
   * connection (bench/packet-cost.ts profile: 3.94 % of busy CPU in the
   * hooks against 3.28 % without the rule; 3.45 % so). An IPv4 packet pays
   * one nfproto comparison.
   */
  private routingHeaderRules(): RuleDecl[] {
    this.chains.push({ name: 'routing_header', rules: this.denyTail('routing-header', undefined, true) });
    return [
      rule(
        [match.ip6Nexthdr(IPPROTO_ROUTING), match.routingHeaderOtherThan(2), verdict.goto('routing_header')],
        this.tagged(undefined, 'routing-header', ': IPv6 routing headers'),
      ),
    ];
  }

  /**
   * A SYN-ACK sent with a SYN cookie leaves from no socket — the kernel
   * answers so when a listener's queue of half-open connections is full —
   * so no user, group or cgroup: the system domains' maps do not see it.
   * A peer that fills a member's small queue with SYNs it never completes
   * (two fill a backlog of 1: the member's own SYN-ACKs are dropped, so
   * they stay half-open) gets its next connection answered so, and the
   * member can accept it. Its own packets on it are dropped; but what it
   * left queued when it closes the socket the kernel sends on without an
   * owner, and a closed socket keeps no user or group (its cgroup it
   * keeps): measured, 1,900 bytes a member found by user wrote and closed
   * on reached the peer under a default allow. Nothing later in the chain
   * can tell whose such a packet is, so while a system domain has members
   * found by user or group, every SYN-ACK sent from no socket is dropped
   * here, and no peer is answered so. That gives up SYN cookies' defence
   * against SYN floods for the machine's listeners (as
   * `net.ipv4.tcp_syncookies=0` would); members named by unit, slice or
   * cgroup keep it. Loopback was let out before.
   *
   * Entered by SYN-ACKs only; what leaves from a socket goes on: a request
   * socket's SYN-ACK (its listener's owner, which the maps above judged),
   * and that of a service in the kernel (nfsd, ksmbd), whose sockets have
   * no owner but are sockets.
   *
   * It narrows the way, not closes it: a SYN cookie needs no SYN-ACK to be
   * sent. An ACK whose cookie checks out completes a connection to a
   * listener that overflowed in the last two minutes, and one guessed blind
   * does with a chance of 2^-29 (a live request socket's, without cookies,
   * 2^-32). README, "What does not hold".
   */
  private synCookieRules(): RuleDecl[] {
    const guard = synCookieGuard(this.policy);
    if (!guard) return [];
    if (this.facts.tcpSyncookies === 2)
      this.warn(
        guard.at,
        `net.ipv4.tcp_syncookies is 2 here: every SYN-ACK is sent with a SYN cookie, and while system domain ${guard.name} has members found by user or group the table drops them all, so no TCP connection from the network can come in; set it to 1, or name the members by unit, slice or cgroup`,
      );
    this.chains.push({
      name: 'syn_cookies',
      rules: [
        rule([match.fromSocket(), verdict.return()], 'a SYN-ACK from a socket: the rules below decide'),
        ...this.unkeyedTail(SYN_COOKIES_RULE, guard.at, true),
      ],
    });
    return [rule([match.tcpSynAck(), verdict.jump('syn_cookies')], this.tagged(guard.at, SYN_COOKIES_RULE, ': SYN-ACKs sent from no socket'))];
  }

  /**
   * DNS (udp and tcp 53), DNS-over-TLS (tcp 853) and DNS-over-QUIC (udp
   * 853) off the host: the resolver's own packets — its upstream sockets
   * carry `dns.mark` (SO_MARK) — pass whatever the rules below say (a
   * default deny, the DoH addresses the global list denies); with
   * `dns.exclusive`, everyone else's are dropped and logged, whatever
   * their app or the default would allow, so no process asks a server of
   * its own past the resolver (which fills the name sets and answers
   * denied names NXDOMAIN).
   *
   * After loopback (clients reach the resolver there), system domains
   * (members have no network, DNS included), lockdown (the kill switch
   * stops the resolver's upstream queries too) and Tor's own user (the
   * exception to lockdown; Tor resolves names through its exits and its
   * relays may listen on any port); before the apps, so that no app rule
   * or default opens it up. Updaters over Tor reach only the SOCKS port,
   * before all of this.
   *
   * Every packet that gets here pays one rule: the protocol and the
   * destination port, each a load and a lookup in a two-element constant
   * set (which nft keeps as a bitmap); the mark and the socket's uid are
   * read only for packets to those ports. Without `exclusive`, one rule
   * tests the mark first.
   */
  /**
   * What on loopback is a way onto the network, and so is not simply accepted. Tor's SOCKS port: Tor carries whoever
   * connects anywhere, so for all but the updaters (dispatched before loopback) it is network, and a system domain's
   * member, lockdown, an app's rules and the default judge it as the address Tor would reach (any loopback address: Tor
   * may listen on more than the one the policy names). And DNS, for a system domain's members: a resolver on loopback
   * (egressd's, systemd-resolved's, a dnsmasq) asks upstream under its own identity, so the name a member looks up would
   * leave the machine. egressd's resolver refuses them, but it learns who asks from the sending socket, after the
   * datagram came: a member that closes its socket at once, on a port another user's socket shares (SO_REUSEADDR, as
   * avahi's 5353), would be taken for that user. The table judges the packet by the socket that sent it.
   */
  private loopbackExceptions(systemDomainRules: readonly RuleDecl[]): RuleDecl[] {
    const rules: RuleDecl[] = [];
    const { tor } = this.policy;
    if (tor.enabled && socksOnLoopback(tor.socks))
      rules.push(rule([match.tcpDport(tor.socks.port), verdict.return()], "Tor's SOCKS port is network for all but the updaters"));
    if (systemDomainRules.length > 0) {
      this.chains.push({ name: 'loopback_dns', rules: [...systemDomainRules, rule([verdict.accept()], 'DNS on loopback, from no system domain')] });
      const ports = [match.l4proto(`@${DNS_PROTOCOLS_SET}`), match.dport(`@${DNS_PORTS_SET}`)];
      rules.push(rule([...ports, verdict.goto('loopback_dns')], "DNS on loopback: a system domain's members have none"));
    }
    return rules;
  }

  private dnsRules(): RuleDecl[] {
    const { dns } = this.policy;
    // The mark alone is not the resolver: since Linux 5.17 CAP_NET_RAW lets a socket carry any mark, and a
    // program with that capability (mtr-packet, a ping) runs as its user. The resolver's sockets are root's.
    const mark = [match.mark(`0x${dns.mark.toString(16).padStart(8, '0')}`), match.skuid(0)];
    // Declared at the end (run), after the policy's own sets, unless a rule of the policy declared them first.
    const ports = [match.l4proto(`@${DNS_PROTOCOLS_SET}`), match.dport(`@${DNS_PORTS_SET}`)];
    const resolver = this.tagged(undefined, DNS_RESOLVER_RULE, ": the resolver's own queries");
    if (!dns.exclusive) return [rule([...mark, ...ports, stmt.counter(), verdict.accept()], resolver)];
    this.chains.push({
      name: 'dns_egress',
      rules: [rule([...mark, stmt.counter(), verdict.accept()], resolver), ...this.denyTail(DNS_EXCLUSIVE_RULE, undefined, true)],
    });
    return [rule([...ports, verdict.goto('dns_egress')], this.tagged(undefined, DNS_EXCLUSIVE_RULE, ': DNS, DNS-over-TLS and DNS-over-QUIC'))];
  }

  /**
   * Updaters reach only Tor's SOCKS port — not loopback services, not the
   * network. A SOCKS gateway on another host (Whonix-style) is network, so
   * system domains and lockdown still come first for it.
   *
   * A SOCKS port on loopback is an unprivileged port: any user's program
   * may hold it before Tor starts or while Tor is down, and would be sent
   * every update host name. So nothing but Tor answers from it: a packet
   * from the SOCKS address and port on lo whose socket is neither Tor's
   * user's nor root's is dropped — the SYN-ACK too, which leaves from a
   * request socket whose `meta skuid` is its listener's (measured in
   * test/tor/socks-owner-kernel.test.ts), so such a listener never completes
   * a handshake. Root's, because Debian's tor.service starts Tor as root and
   * Tor opens its listeners before it switches to its User (measured: the
   * SOCKS listener's owner is uid 0). A packet without an owner (the
   * kernel's resets) breaks the rule and carries nothing.
   */
  private torUpdaterRules(systemDomainRules: readonly RuleDecl[], torUid: number | undefined): RuleDecl[] {
    const { tor } = this.policy;
    const { socks } = tor;
    const loopback = socksOnLoopback(socks);
    const toSocks = [match.daddrIs(socks.family, socks.address), match.tcpDport(socks.port)];
    const chainRules: RuleDecl[] = [];
    const guard: RuleDecl[] = [];
    if (loopback) {
      const answers = [match.oif('lo'), match.saddrIs(socks.family, socks.address), match.tcpSport(socks.port)];
      const owners = torUid === undefined || torUid === 0 ? [0] : [0, torUid];
      guard.push(
        rule(
          [...answers, match.skuidNotIn(owners), ...this.denyVerdict(TOR_SOCKS_ANSWER_RULE, tor.at, true, 'tor_socks_answer')],
          this.tagged(tor.at, TOR_SOCKS_ANSWER_RULE, ': only Tor answers on its SOCKS port'),
        ),
      );
      chainRules.push(rule([match.oif('lo'), ...toSocks, verdict.accept()], this.tagged(tor.at, 'tor/socks')));
    } else {
      chainRules.push(...systemDomainRules);
      if (this.options.lockdown) chainRules.push(rule([verdict.goto('lockdown')], 'lockdown is on'));
      chainRules.push(rule([...toSocks, verdict.accept()], this.tagged(tor.at, 'tor/socks')));
    }
    chainRules.push(...this.denyTail('tor/updaters', tor.at, true));
    this.chains.push({ name: 'tor_updaters', rules: chainRules });
    const updaters = this.newDispatch('tor');
    const closed = { chain: 'cut_tor_updaters', make: () => this.closedChain('cut_tor_updaters', 'tor/updaters', tor.at) };
    // A SOCKS port on loopback adds nothing for a process that moves in (loopback is open to every
    // identity), but a gateway on another host is network that its user's own app may deny.
    const delegated =
      !loopback && this.rootIdentities ? { chain: 'uc_tor_updaters', make: () => this.delegatedChain('uc_tor_updaters', chainRules) } : undefined;
    this.keepForTracker(tor.updaters, closed, delegated);
    for (const identity of tor.updaters) this.claim(updaters, identity, verdict.goto('tor_updaters'), 'Tor updaters', false, closed, delegated);
    return [...guard, ...this.dispatchRules(updaters, 'updaters over Tor')];
  }

  private appChain(app: App): RuleDecl[] {
    const rules: RuleDecl[] = [];
    const tag = this.tags.get(app.name);
    for (const r of app.rules) rules.push(...this.ruleDecls(r, appSetPrefix(app, r), { tag }));
    // An app's own rules outrank the global deny list; its default does not.
    const globalDeny = this.ownGlobalDeny.has(app.name) ? globalDenyChain(app.name) : 'global_deny';
    rules.push(rule([verdict.jump(globalDeny)], comment(app.at, `app/${app.name}: then the global deny list`)));
    rules.push(...this.defaultTail(`app/${app.name}/default`, app.defaultVerdict, app.at, tag));
    this.ownerlessReplay(app, tag);
    return rules;
  }

  /**
   * A socket its program closed goes on sending without an owner — queued
   * data, its FIN, the last ACK from TIME_WAIT — so `meta skuid` finds no
   * app, and the packet meets the global deny list and the global default.
   * Where the app's own rule lets it reach an address the list names, its
   * connection lost its last ACK there (the peer resent its FIN from
   * LAST_ACK for seconds, each ACK dropped and logged as a denial; measured
   * in test/enforce/e2e.test.ts).
   *
   * So where the list would drop such a packet and its connection carries
   * an app's tag, it meets that app's own rules first, those the app meets
   * before the list, replayed in order: one that allows accepts it, one that
   * denies leaves it to the list, as before. The lookup sits in the list's
   * drop path (denyVerdict), so no other packet pays for it and no other
   * decision changes. The tag alone is not enough: an app's default allow
   * tags its connections too, and the list outranks it — a program that
   * opened a connection before its address was listed (by a name's answer,
   * which no apply cuts), queued data and closed its socket would send it
   * past the list. Only TCP without SYN is replayed: what a closed socket
   * sends, and no handshake — a SYN-ACK sent with SYN cookies has no owner
   * either, and a process that binds the port an app's server left could
   * answer a peer's SYN on that app's stale connection (conntrack resyncs
   * it), tag and all, and then send past the list from a socket it closed.
   *
   * Only where it can matter: conntrack on (the tag), a global deny list,
   * and a rule of the app's that allows. A packet with an owner returns at
   * once: it met its own identity's rules before the list.
   */
  private ownerlessReplay(app: App, tag: number | undefined): void {
    if (!this.tracked || tag === undefined || this.policy.globalDeny.length === 0) return;
    const last = app.rules.map((r) => r.verdict).lastIndexOf('allow');
    if (last < 0) return;
    const chain = `ownerless_app_${app.name}`;
    const replayed = app.rules.slice(0, last + 1).flatMap((r) => this.ruleDecls(r, appSetPrefix(app, r), { replay: true }));
    this.chains.push({ name: chain, rules: [rule([match.owned(), verdict.return()], 'a socket with an owner: its identity decided'), ...replayed] });
    this.replays.push({ tag, chain });
  }

  /**
   * What letting a packet out ends with: in a table that uses conntrack, the
   * identity's tag written into the connection's mark first (ct-mark.ts).
   * Written on every packet a rule lets out, not only a connection's first:
   * testing `ct state new` costs as much as the write (three expressions
   * each; the kernel stores a mark only when it changes), and it lets a
   * connection opened before a marking table become its identity's while a
   * rule still allows it. A default allow marks new connections only
   * (`defaultTail`): a SYN-ACK may fall to it from another identity's server.
   */
  private allowTail(tag: number | undefined): Statement[] {
    if (!this.tracked || tag === undefined) return [verdict.accept()];
    return [stmt.ctMarkSet(CT_MARK_KEEP, markValue(tag)), verdict.accept()];
  }

  /**
   * One policy rule → nft rules: one per address family and kind of address,
   * or one if it matches any address (`form` says which kind of rule).
   */
  private ruleDecls(r: Rule, setPrefix: string, form: RuleForm = {}): RuleDecl[] {
    const { tag, copyFor, replay = false, listed = false } = form;
    const tail = replay
      ? r.verdict === 'allow'
        ? [stmt.counter(), verdict.accept()]
        : [verdict.return()]
      : [stmt.counter(), ...(r.verdict === 'allow' ? this.allowTail(tag) : this.denyVerdict(r.id, r.at, r.log, setPrefix, copyFor, listed))];
    const l4 = this.protocolMatch(r);
    const text = this.tagged(r.at, r.id, replay ? ': without an owner, on its connection' : '', copyFor);
    if (r.to.any) return [rule([...l4, ...tail], text)];
    const declare = copyFor === undefined && !replay;

    const decls: RuleDecl[] = [];
    for (const family of [4, 6] as const) {
      const key = family === 4 ? 'ipv4_addr' : 'ipv6_addr';
      const bits = family === 4 ? 32 : 128;
      const { hashed, rest } = splitByPrefix(r.to.networks.filter((net) => net.family === family));
      for (const [prefix, networks] of hashed) {
        const name = `${setPrefix}_net${family}_p${prefix}`;
        if (declare) this.sets.push({ name, key, flags: [], elements: networks.map((net) => net.address), comment: text });
        const lookup = prefix === bits ? match.daddr(family, name) : match.daddrMasked(family, prefix, name);
        decls.push(rule([lookup, ...l4, ...tail], text));
      }
      if (rest.length > 0) {
        const name = `${setPrefix}_net${family}`;
        if (declare) this.sets.push({ name, key, flags: ['interval'], elements: rest.map(networkElement), comment: text });
        decls.push(rule([match.daddr(family, name), ...l4, ...tail], text));
      }
    }
    if (r.to.names.length + r.to.suffixes.length + r.to.lists.length > 0) {
      const set4 = `${setPrefix}_dns4`;
      const set6 = `${setPrefix}_dns6`;
      decls.push(rule([match.daddr(4, set4), ...l4, ...tail], text));
      decls.push(rule([match.daddr(6, set6), ...l4, ...tail], text));
      if (declare) {
        // Filled by the resolver with each answer's addresses, expiring with the answer's TTL.
        const source = this.dnsSource(r);
        this.sets.push({ name: set4, key: 'ipv4_addr', flags: ['timeout'], elements: [], comment: text, source });
        this.sets.push({ name: set6, key: 'ipv6_addr', flags: ['timeout'], elements: [], comment: text, source });
        const shared = r.sharedAddresses === undefined ? {} : { sharedAddresses: r.sharedAddresses };
        this.dnsBindings.push({ ruleId: r.id, verdict: r.verdict, names: r.to.names, suffixes: r.to.suffixes, lists: r.to.lists, set4, set6, ...shared });
      }
    }
    return decls;
  }

  /** A rule's protocols and ports: one of each is a comparison, several a constant set. */
  private protocolMatch(r: Rule): Statement[] {
    if (!r.protocols) return [];
    const names = [...new Set(r.protocols.flatMap((p) => (p === 'icmp' ? ['icmp', 'ipv6-icmp'] : [p])))].sort();
    const protocols = names.length === 1 ? names[0]! : `@${this.constantSet(`proto_${names.join('_').replace(/-/g, '_')}`, 'inet_proto', names)}`;
    const out = [match.l4proto(protocols)];
    if (r.ports) {
      const ranges = joinPortRanges(r.ports);
      const ports = ranges.map((p): Element => (p.from === p.to ? p.from : { range: [p.from, p.to] }));
      if (ports.length === 1) out.push(match.dport(ports[0]!));
      else {
        const spelled = `ports_${ranges.map((p) => (p.from === p.to ? p.from : `${p.from}to${p.to}`)).join('_')}`;
        const name = spelled.length <= 48 ? spelled : `ports_${createHash('sha256').update(spelled).digest('hex').slice(0, 12)}`;
        out.push(match.dport(`@${this.constantSet(name, 'inet_service', ports, ranges.some((p) => p.from !== p.to) ? ['interval'] : [])}`));
      }
    }
    return out;
  }

  /**
   * A rule's literal set of protocols or ports, as a named set that
   * every rule with the same elements shares, named by them. Never an
   * anonymous `{ … }`: the kernel names each anonymous set by scanning every
   * set of the table (nf_tables_set_alloc_name: an sscanf per set), and while
   * an apply writes the next generation the table holds both — 800 anonymous
   * sets for 200 apps cost 200–250 ms of kernel time per apply (measured). A
   * named constant set is written once and kept while its elements stay.
   * (The two ICMPv6 type sets of link_local stay anonymous: two per
   * generation, whatever the policy's size.)
   */
  private constantSet(name: string, key: SetKey, elements: readonly Element[], flags: readonly SetFlag[] = []): string {
    const known = this.constants.get(name);
    if (known !== undefined && known !== JSON.stringify(elements)) throw new Error(`internal: constant set ${name} named for two contents`);
    if (known === undefined) {
      this.constants.set(name, JSON.stringify(elements));
      this.sets.push({ name, key, flags, elements });
    }
    return name;
  }

  /** What fills a rule's DNS sets: its verdict, names and suffixes, and its lists by content. */
  private dnsSource(r: Rule): string {
    const hash = createHash('sha256').update(JSON.stringify([r.verdict, r.to.names, r.to.suffixes]));
    for (const name of r.to.lists) hash.update(`\0${name}\0${listDigest(this.policy.lists.get(name))}`);
    return hash.digest('hex');
  }

  /**
   * A deny that logs jumps to a chain of its own: a `limit` in the deny rule
   * itself would make the rule stop matching above the rate and let the packet
   * through; in its own chain the limit only thins the log. `listed`: a rule
   * of the global deny list, where a packet on an app's connection without
   * an owner meets that app's own rules first (ownerlessReplay) — only a
   * packet the list would drop pays for the lookup.
   */
  private denyVerdict(id: string, at: Origin | undefined, log: boolean, setPrefix: string, copyFor?: string, listed = false): Statement[] {
    // Never a SYN: a listener's SYN-ACK sent with SYN cookies has no owner, and one bound to a port an app's server left could
    // answer on that app's stale connection, carrying its tag. What a closed socket sends carries none.
    const replay =
      listed && this.replays.length > 0
        ? [
            rule(
              [match.tcpWithoutSyn(), dispatch.ctMark(CT_MARK_MASK, OWNERLESS_MAP)],
              "TCP on an app's connection without an owner: that app's own rules first",
            ),
          ]
        : [];
    if (!log || !this.log.denials) {
      if (replay.length === 0) return [verdict.drop()];
      const chain = `drop_${setPrefix}`;
      if (!this.chains.some((c) => c.name === chain))
        this.chains.push({ name: chain, rules: [...replay, rule([stmt.counter(), verdict.drop()], this.tagged(at, id))] });
      return [verdict.goto(chain)];
    }
    const chain = copyFor === undefined ? `log_${setPrefix}` : `log_${setPrefix}_${globalDenyChain(copyFor)}`;
    if (!this.chains.some((c) => c.name === chain)) this.chains.push({ name: chain, rules: [...replay, ...this.denyTail(id, at, true, copyFor)] });
    return [verdict.goto(chain)];
  }

  /**
   * The kernel's multicast reports over their rate: dropped, counted. The
   * rate bounds what joins can make the kernel say for anyone who joins;
   * the host's own reports need far less (a few hundred bytes per interface
   * per querier's round, 125 s by default; a burst when addresses come up).
   */
  private reportLimit(what: string): RuleDecl[] {
    return [
      rule(
        [stmt.limitBytesOver(REPORT_BYTES_PER_SECOND, REPORT_BURST_BYTES), stmt.counter(), verdict.drop()],
        `${what} reports over ${REPORT_BYTES_PER_SECOND} bytes/s`,
      ),
    ];
  }

  /**
   * The end of a denying path: log (rate-limited) and drop, counting.
   *
   * The log's limit is per rule and sending uid: a meter (a dynamic set
   * keyed by `meta skuid`, one per rule) holds a limit for each uid, so one
   * uid flooding a rule thins only its own log, and another's denials on the
   * same rule are still logged. The set is bounded (LOG_METER_SIZE uids per
   * rule, COPY_LOG_METER_SIZE per app's copy of a global rule, each gone
   * LOG_METER_TIMEOUT s after its last packet): when it is
   * full, a new uid's packets are dropped unlogged (still counted) until a
   * slot frees — the kernel's memory stays bounded whatever sends. Packets
   * without an owner (the kernel's own, an orphaned socket's) have no uid to
   * key on and share one limit per rule, as before. It all runs only on
   * packets already being dropped.
   */
  private denyTail(id: string, at: Origin | undefined, log: boolean, copyFor?: string): RuleDecl[] {
    const rules: RuleDecl[] = [];
    const text = this.tagged(at, id, '', copyFor);
    if (log && this.log.denials) {
      const { count, per } = this.log.rate;
      const shortId = this.shortId(id, copyFor);
      const prefix = logPrefix(shortId);
      const size = copyFor === undefined ? LOG_METER_SIZE : COPY_LOG_METER_SIZE;
      const meter = this.logMeter(shortId, meterTimeout(count, per, this.log.burst), `${count}/${per} burst ${this.log.burst}`, size);
      rules.push(
        rule(
          [
            stmt.update(meter, { meta: { key: 'skuid' } }, [stmt.limit(count, per, this.log.burst)]),
            stmt.log(prefix, this.log.group),
            stmt.counter(),
            verdict.drop(),
          ],
          text,
        ),
        // Over its own uid's limit (or the meter is full): dropped, not logged.
        rule([match.owned(), stmt.counter(), verdict.drop()], text),
      );
    }
    return [...rules, ...this.unkeyedTail(id, at, log, copyFor)];
  }

  /**
   * The end of every drop: logged at one limit for the rule (when `log`
   * and denials are logged), counted, dropped. What packets without an
   * owner meet, having no uid to key a meter on — alone, in a chain only
   * such packets reach.
   */
  private unkeyedTail(id: string, at: Origin | undefined, log: boolean, copyFor?: string): RuleDecl[] {
    const text = this.tagged(at, id, '', copyFor);
    const { count, per } = this.log.rate;
    return [
      ...(log && this.log.denials
        ? [rule([stmt.limit(count, per, this.log.burst), stmt.log(logPrefix(this.shortId(id, copyFor)), this.log.group)], text)]
        : []),
      rule([stmt.counter(), verdict.drop()], text),
    ];
  }

  /**
   * The meter of a rule's log limit, one per short id (a rule's tails share
   * it). Each uid's element holds the limit it was made with, so the limit is
   * its source: a new rate names a new set, and no uid keeps the old one.
   */
  private logMeter(shortId: string, timeout: number, limit: string, size: number): string {
    const name = `lograte_${shortId}`;
    if (!this.meters.has(name)) {
      this.meters.add(name);
      // Said outright: nft infers `dynamic` only when the set and a rule that updates it are in one
      // transaction, and the base chain's rules come in the swap's second one (the kernel then refuses the update: EINVAL).
      this.sets.push({ name, key: 'uid', flags: ['dynamic', 'timeout'], elements: [], size, timeout, source: limit });
    }
    return name;
  }

  /**
   * The end of the chain when nothing else decided, for an identity with
   * conntrack tag `tag` (the global default's or an app's). A default deny
   * applies to new connections only: packets of connections already let out
   * or let in pass just before it — after every explicit deny, which cuts
   * them too — but only on connections that are this identity's own: their
   * mark carries its tag, written when one of its rules let a packet out
   * (allowTail). Another identity's entry, borrowed by binding its source
   * port, carries another tag and meets the deny.
   *
   * A connection that came in (a server's replies: `ct direction reply`)
   * carries no tag until the first answer; that answer claims it for the
   * identity that sends it, and from then on only that identity answers on
   * it. (An answer an allow rule or a default allow lets out claims it there.)
   * Related packets (ICMP errors) carry their connection's mark; a connection
   * a helper expects inherits its master's (init_conntrack copies it).
   *
   * The global default also lets through established packets that have no
   * owner (`meta skuid` loads nothing): the kernel's own — data and FIN sent
   * after close() from an orphaned socket, whose app was found by uid and so
   * is not found any more, resets, ICMP errors. A process sends a packet
   * without an owner only on a tuple it holds or held, or as a listener's
   * SYN-ACK sent with SYN cookies — an answer to a peer that connects in,
   * as any server's. Only packets that would otherwise be dropped walk that
   * check.
   *
   * Only a default deny uses conntrack, so a table without one leaves it off
   * in the namespace (it costs every new connection, bench/packet-cost.ts),
   * and has no mark either.
   */
  private defaultTail(id: string, verdictName: 'allow' | 'deny', at: Origin | undefined, tag: number | undefined): RuleDecl[] {
    if (verdictName === 'allow') {
      // The global default's own connections stay unmarked when it allows: every packet of every
      // process no app names ends here, and marking cost the table a tenth more CPU per new connection
      // (bench/packet-cost.ts (b'): 11.1 % of busy CPU in the hooks marked, 10.4 % not). A mark would only
      // keep them working should the default become deny, as for connections opened while conntrack was
      // off; no default deny accepts an unmarked connection of its own (only answers it claims).
      if (!this.tracked || tag === undefined || tag === DEFAULT_TAG) return [rule([stmt.counter(), verdict.accept()], this.tagged(at, id))];
      // An app's: marked when a connection starts from here only: a SYN-ACK that falls to a default allow (its
      // request socket has no cgroup to be dispatched by) would otherwise make the connection this
      // identity's, and the server's own answers, under its app's default deny, another's.
      return [
        rule([match.ctState(['new']), stmt.ctMarkSet(CT_MARK_KEEP, markValue(tag))], this.tagged(at, id, ': its new connections are its own')),
        rule([stmt.counter(), verdict.accept()], this.tagged(at, id)),
      ];
    }
    if (tag === undefined) throw new Error(`internal: ${id} denies by default but has no conntrack tag`);
    const mark = markValue(tag);
    const rules = [
      rule(
        [match.ctState(['established', 'related']), match.ctMark(CT_MARK_MASK, mark), verdict.accept()],
        this.tagged(at, id, ': its own established and related connections'),
      ),
      rule(
        [
          match.ctDirection('reply'),
          match.ctMark(CT_MARK_MASK, markValue(UNCLAIMED_TAG)),
          match.fullSocket(),
          stmt.ctMarkSet(CT_MARK_KEEP, mark),
          verdict.accept(),
        ],
        this.tagged(at, id, ': answers on connections that came in, claimed'),
      ),
      // A SYN-ACK leaves from a request socket, which `socket cgroupv2` cannot place: it reaches the
      // apps by uid and the global default, whose claim would make the connection theirs and the
      // server's own answers another identity's. Unclaimed, it passes; the server's full socket
      // claims the connection with its first answer. Only the kernel sends from a socket not full.
      rule(
        [match.ctDirection('reply'), match.ctMark(CT_MARK_MASK, markValue(UNCLAIMED_TAG)), verdict.accept()],
        this.tagged(at, id, ': answers from a socket not yet full, unclaimed'),
      ),
    ];
    if (tag === DEFAULT_TAG) {
      if (!this.chains.some((c) => c.name === 'ownerless')) {
        this.chains.push({
          name: 'ownerless',
          rules: [rule([match.owned(), verdict.return()], 'a socket with an owner'), rule([verdict.accept()], "the kernel's own packets")],
        });
      }
      rules.push(rule([match.ctState(['established', 'related']), verdict.jump('ownerless')], this.tagged(at, id, ': established, without an owner')));
    }
    return [...rules, ...this.denyTail(id, at, true)];
  }

  private newDispatch(prefix: string): Dispatch {
    return {
      prefix,
      cgroupLevels: new Map(),
      uids: { points: new Map(), ranges: [], later: [] },
      gids: { points: new Map(), ranges: [], later: [] },
      cutOffs: [],
    };
  }

  /**
   * The chains an identity chosen by cgroup may send the tracker's new
   * members to — its delegated members' (`delegatedChain`), its cut-off
   * ancestors' (`closedChain`) — made whether or not such a member exists
   * now. Made only when one existed, a later apply without one took the
   * chain away, and the next member (a user's app started again) waited
   * for a re-apply, meeting meanwhile what follows (its user's identities,
   * the default): under a default allow, none of its app's denies.
   */
  private keepForTracker(identities: readonly Identity[], closed: Closed | undefined, delegated: Delegated | undefined): void {
    const globs = identities.flatMap((identity) => identity.selectors.flatMap((s) => (s.kind === 'cgroup' ? [s.glob] : [])));
    if (globs.length === 0) return;
    if (globs.some(mayMatchUnnamed)) closed?.make();
    delegated?.make();
  }

  /** A chain that lets nothing out, deciding as the rule `ruleId` of the owner does; made once. */
  private closedChain(name: string, ruleId: string, at: Origin | undefined): Verdict {
    if (!this.chains.some((c) => c.name === name)) this.chains.push({ name, rules: this.denyTail(ruleId, at, true) });
    return verdict.goto(name);
  }

  /**
   * Adds an identity's selectors to a dispatch; the first owner of a key keeps it, and a clash is reported.
   * `mustExist`: a user or group that does not exist is an error (unless its selector is optional).
   *
   * A member cgroup nft cannot name (a user names the cgroups of its own
   * subtree, with any bytes) is left out with a warning, and apply goes on:
   * nothing a user can create may stop it. Left out, its packets meet what
   * follows — shallower cgroups, uid, gid, the global deny list, the
   * default. For an identity that denies (`closed`: a system domain, the
   * updaters over Tor, an app whose default is deny) that could let out
   * what it keeps in, so its nearest ancestor nft can name is cut off
   * instead, at its own level, with a verdict that lets nothing out. The
   * ancestor is a cgroup the creating user could write to — its own
   * subtree — so what else is cut off is that user's own; members named at
   * the deeper level are looked up first and keep their own verdict.
   *
   * A member cgroup a non-root uid owns (`Facts.cgroupOwners`: systemd
   * delegated it, or its user made it there) gets `delegated`'s verdict
   * instead, where the identity could gain from it: its user can move any
   * of its processes in, so the identity may take away from what the
   * user's and group's own identities allow, never add (`delegatedChain`).
   * Cgroups are looked up before uids and gids, so without this a user
   * whose own app denies made a cgroup matching another app's glob and
   * took that app's allowances.
   */
  private claim(d: Dispatch, identity: Identity, target: Verdict, owner: string, mustExist: boolean, closed?: Closed, delegated?: Delegated): void {
    for (const selector of identity.selectors) {
      if (selector.kind === 'cgroup') {
        const level = cgroupLevel(d, selector.level);
        const map = `${d.prefix}_cg_l${selector.level}`;
        const binding = { owner, glob: selector.glob, level: selector.level, map, verdict: target, ...(closed ? { closed: closed.chain } : {}) };
        this.cgroupBindings.push(delegated ? { ...binding, delegated: delegated.chain } : binding);
        const matches = cgroupGlobMatcher(selector.glob);
        for (const cgroup of this.cgroups) {
          const { path } = cgroup;
          if (!matches(path)) continue;
          if (!cgroup.nameable) {
            if (closed === undefined) {
              this.warn(identity.at, `cgroup ${cgroup.shown} has a name nftables cannot carry; it is left out`);
            } else if (cgroup.namedAncestor === '') {
              this.error(identity.at, `cgroup ${cgroup.shown} of ${owner} has a name nftables cannot carry, and so has every ancestor`, 'rename it');
            } else {
              d.cutOffs.push({
                level: cgroup.namedAncestor.split('/').length,
                path: cgroup.namedAncestor,
                closed: closed.make,
                owner,
                at: identity.at,
                shown: cgroup.shown,
              });
            }
            continue;
          }
          const earlier = level.claimed.get(path);
          if (earlier !== undefined) {
            if (earlier !== owner) this.warn(identity.at, `cgroup ${path} matches both ${earlier} and ${owner}; ${earlier} keeps it`);
            continue;
          }
          level.claimed.set(path, owner);
          level.elements.push(path);
          level.verdicts.push(delegated && this.facts.cgroupOwners?.has(path) ? delegated.make() : target);
        }
        continue;
      }
      const isUser = selector.kind === 'user';
      const id = this.idOf(
        selector.kind,
        isUser ? selector.user : selector.group,
        identity.at,
        `${selector.kind} ${JSON.stringify(isUser ? selector.user : selector.group)} of ${owner}`,
        mustExist && selector.optional !== true,
      );
      if (id === undefined) continue;
      const kind = isUser ? 'uid' : 'gid';
      for (const taken of claimIds(isUser ? d.uids : d.gids, id, id, target, owner))
        this.warn(identity.at, `${kind} ${id} belongs to both ${taken.owner} and ${owner}; ${taken.owner} keeps it`);
      const name = JSON.stringify(isUser ? selector.user : selector.group);
      const at = identity.at;
      if (isUser) {
        // A process in a user namespace the user mapped to its subordinate ranges sends with those ids.
        const ranges = this.factOf(this.facts.subordinate, id, at, `the subordinate ids of user ${name}`);
        for (const range of ranges?.uids ?? []) d.uids.later.push({ rank: SUBORDINATE, ...range, target, owner, at, what: `subordinate uids of user ${name}` });
        for (const range of ranges?.gids ?? []) d.gids.later.push({ rank: SUBORDINATE, ...range, target, owner, at, what: `subordinate gids of user ${name}` });
        continue;
      }
      // A group's members stay its members whatever group they send with (sg, newgrp, a setgid program):
      // their uids join the group's identity. Its gid stays too: a non-member running a setgid program is still the group.
      const members = this.factOf(this.facts.members, id, at, `the members of group ${name}`) ?? [];
      // So does a member's rootless container, which sends with the member's subordinate ids: they join at the members' rank.
      // Ranges that could not be read are one error for the group, not one per member.
      const unread = members.find((uid) => {
        const ranges = this.facts.subordinate?.get(uid);
        return ranges !== undefined && 'error' in ranges;
      });
      if (unread !== undefined) this.factOf(this.facts.subordinate, unread, at, `the subordinate ids of uid ${unread}, a member of group ${name}`);
      for (const uid of members) {
        d.uids.later.push({ rank: MEMBER, from: uid, to: uid, target, owner, at, what: `member of group ${name}` });
        const ranges = unread === undefined ? this.factOf(this.facts.subordinate, uid, at, `the subordinate ids of uid ${uid}`) : undefined;
        for (const range of ranges?.uids ?? [])
          d.uids.later.push({ rank: MEMBER, ...range, target, owner, at, what: `subordinate uids of members of group ${name}` });
        for (const range of ranges?.gids ?? [])
          d.gids.later.push({ rank: MEMBER, ...range, target, owner, at, what: `subordinate gids of members of group ${name}` });
      }
      if (this.facts.membersIncomplete !== undefined)
        this.warn(
          at,
          `group ${name} of ${owner}: ${this.facts.membersIncomplete}; a member whose primary group it is and that it does not list is matched by its group only, and leaves it by changing group (sg, newgrp, a setgid program)`,
        );
    }
  }

  /** Subordinate ranges or members from the facts; one that could not be read is an error wherever it is used, like a failed lookup. */
  private factOf<T>(facts: ReadonlyMap<number, T | { readonly error: string }> | undefined, id: number, at: Origin, what: string): T | undefined {
    const found = facts?.get(id);
    if (found === undefined || !(typeof found === 'object' && found !== null && 'error' in found)) return found;
    this.lookupFailed = true;
    this.error(at, `cannot read ${what}: ${found.error}`, 'whether they would be let out is unknown, so the rules cannot be built; fix it and try again');
    return undefined;
  }

  /**
   * Claims what identities hold through another name, by rank, then in
   * the order they were met. An id claimed before keeps its owner, and a
   * clash is reported once per identity, owner and kind of claim (a group
   * of thousands of members makes one warning, not thousands).
   */
  private claimLater(table: IdClaims, kind: 'uid' | 'gid'): void {
    const clashes = new Map<string, { at: Origin; ids: string[] }>();
    for (const claim of [...table.later].sort((a, b) => a.rank - b.rank)) {
      for (const taken of claimIds(table, claim.from, claim.to, claim.target, claim.owner)) {
        const key = JSON.stringify([claim.what, claim.owner, taken.owner]);
        const clash = clashes.get(key) ?? { at: claim.at, ids: [] };
        clash.ids.push(taken.from === taken.to ? `${taken.from}` : `${taken.from}-${taken.to}`);
        clashes.set(key, clash);
      }
    }
    for (const [key, { at, ids }] of clashes) {
      const [what, owner, earlier] = JSON.parse(key) as [string, string, string];
      const shown = ids.length > 5 ? `${ids.slice(0, 5).join(', ')} and ${ids.length - 5} more` : ids.join(', ');
      this.warn(
        at,
        `${kind} ${shown} (${what}, for ${owner}) also ${ids.length === 1 && !ids[0]!.includes('-') ? 'belongs' : 'belong'} to ${earlier}, which keeps ${ids.length === 1 && !ids[0]!.includes('-') ? 'it' : 'them'}: ids an identity names come first, then subordinate ids of users, then members of groups and theirs`,
      );
    }
  }

  /**
   * A copy of `rules` (an app's chain, the updaters') for its delegated
   * members, in which every accept goes on to the root identities — the
   * app's own rules, the `ct state established,related` before a default
   * deny, the default allow: what the member's app lets out, the uid's or
   * gid's app must let out too. Its drops stay drops; the global deny and
   * log chains it jumps to only drop. The same sets, so one more chain of
   * rules, made once, when a delegated member is first claimed.
   *
   * Connection marks (ct-mark.ts) are left to whoever decides last: the
   * uid's or gid's app, which marks and checks its own connections, or —
   * where neither has the packet — the member's app itself, entered afresh
   * (`ownChain`). The copy neither writes nor checks a mark: one mark cannot
   * name two identities, and checking the cgroup app's would cut the user's
   * app's own connections. A process of that user gains nothing by it: its
   * user's app decides after, and without one the app's own chain does.
   */
  private delegatedChain(name: string, rules: readonly RuleDecl[], ownChain?: string): Verdict {
    if (!this.chains.some((c) => c.name === name)) {
      // App chains mark in a table that tracks connections (allowTail); the updaters' never do.
      const marked = ownChain !== undefined && this.tracked;
      const root = marked ? `uc_root_${ownChain}` : UC_ROOT_CHAIN;
      this.rootChains.set(root, marked ? verdict.goto(ownChain) : verdict.accept());
      const copy = rules
        // An answer's claim is the established accept's job here: a reply-direction packet is established.
        .filter((r) => !r.expr.some(isCtDirectionMatch))
        .map((r) => ({ ...r, expr: r.expr.filter((s) => !touchesCtMark(s)).map((s) => ('accept' in s ? verdict.goto(root) : s)) }));
      this.chains.push({ name, rules: copy });
    }
    return verdict.goto(name);
  }

  /**
   * A delegated copy's root-identity chain: the apps' uid and gid maps, as
   * the base chain looks them up; with neither, `fallback` decides. A
   * fallback into the app's own chain walks its rules a second time, so
   * their counters count such a packet twice.
   */
  private rootIdentityRules(fallback: Verdict): RuleDecl[] {
    const rules: RuleDecl[] = [];
    const has = (name: string) => this.sets.some((set) => set.name === name);
    if (has('app_uid')) rules.push(rule([dispatch.uid('app_uid')], 'delegated cgroups: then apps by uid'));
    if (has('app_gid')) rules.push(rule([dispatch.gid('app_gid')], 'delegated cgroups: then apps by gid'));
    rules.push(rule([fallback], "delegated cgroups: no app by uid or gid, so the cgroup's app decides alone"));
    return rules;
  }

  /**
   * One verdict-map lookup per cgroup depth in use, then by uid, then by gid.
   * Deeper cgroups are more specific, so they are looked up first; a
   * delegated member's accepts still meet the uid and gid lookups (`UC_ROOT_CHAIN`).
   */
  private dispatchRules(d: Dispatch, what: string): RuleDecl[] {
    for (const cut of d.cutOffs) {
      const level = cgroupLevel(d, cut.level);
      const cutOwner = `cut-off ${cut.owner}`;
      const earlier = level.claimed.get(cut.path);
      if (earlier === undefined) {
        level.claimed.set(cut.path, cutOwner);
        level.elements.push(cut.path);
        level.verdicts.push(cut.closed());
      }
      const message = `cgroup ${cut.shown} of ${cut.owner} has a name nftables cannot carry`;
      if (earlier === undefined || earlier === cutOwner) {
        this.warn(cut.at, `${message}; what its ancestor ${cut.path} holds is cut off instead, but for members named below it`);
      } else {
        this.warn(cut.at, `${message}; its ancestor ${cut.path} is ${earlier}'s, which decides for it`);
      }
    }
    const rules: RuleDecl[] = [];
    for (const level of [...d.cgroupLevels.keys()].sort((a, b) => b - a)) {
      const entry = d.cgroupLevels.get(level)!;
      const name = `${d.prefix}_cg_l${level}`;
      // The selectors that fill it at run time (the app tracker): an empty map of another policy is not this one.
      const source = JSON.stringify(this.cgroupBindings.filter((b) => b.map === name).map((b) => [b.owner, b.glob, b.verdict, b.delegated ?? null]));
      this.sets.push({ name, key: { cgroupLevel: level }, map: 'verdict', flags: [], elements: entry.elements, verdicts: entry.verdicts, source });
      rules.push(rule([dispatch.cgroup(level, name)], `${what} by cgroup (level ${level})`));
    }
    for (const [table, key] of [
      [d.uids, 'uid'],
      [d.gids, 'gid'],
    ] as const) {
      this.claimLater(table, key);
      const entries = [...[...table.points].map(([id, claim]) => ({ from: id, to: id, ...claim })), ...table.ranges].sort((a, b) => a.from - b.from);
      if (entries.length === 0) continue;
      const name = `${d.prefix}_${key}`;
      // An interval map only when it holds a range: a hash lookup costs a packet less than an interval one.
      const flags: SetFlag[] = table.ranges.length > 0 ? ['interval'] : [];
      const elements = entries.map((e): Element => (e.from === e.to ? e.from : { range: [e.from, e.to] }));
      this.sets.push({ name, key, map: 'verdict', flags, elements, verdicts: entries.map((e) => e.target) });
      rules.push(rule([key === 'uid' ? dispatch.uid(name) : dispatch.gid(name)], `${what} by ${key}`));
    }
    return rules;
  }

  /**
   * A user's or group's id from the facts. A lookup that failed is an error
   * wherever the name is used: nobody can tell whether the rule would match.
   */
  private idOf(kind: 'user' | 'group', name: string | number, at: Origin, what: string, mustExist: boolean): number | undefined {
    if (typeof name === 'number') return name;
    const found = (kind === 'user' ? this.facts.users : this.facts.groups).get(name);
    if (typeof found === 'number') return found;
    if (found !== undefined) {
      this.lookupFailed = true;
      this.error(
        at,
        `cannot look up ${kind} "${name}": ${found.error}`,
        'whether it exists is unknown, so its rules cannot be built; fix the name service (nsswitch.conf) and try again',
      );
    } else if (mustExist) {
      this.error(
        at,
        `${what} does not exist on this machine; it would match nothing and be let out`,
        `create it or correct the name; if the name service that knows it (LDAP, sssd, homed) is down, bring it up: it may have answered "not found". Write {${kind}: ${name}, optional: true} only where the name may truly be missing`,
      );
    } else {
      this.warn(at, `${what} does not exist on this machine; its rules match nothing until it does`);
    }
    return undefined;
  }

  private error(at: Origin, message: string, hint: string): void {
    if (!this.errors.some((e) => e.message === message)) this.errors.push({ severity: 'error', at, message, hint });
  }

  private shortId(ruleId: string, copyFor?: string): string {
    const id = this.shortIds.get(entryKey(ruleId, copyFor));
    if (id === undefined) throw new Error(`internal: rule ${ruleId}${copyFor === undefined ? '' : ` (app ${copyFor})`} has no short id`);
    return id;
  }

  /**
   * The comment of a rule that decides for a policy rule: its short id first
   * (a comment is cut at 128 bytes, and file names can be long), then
   * file:line and the rule's own id, for people.
   */
  private tagged(at: Origin | undefined, ruleId: string, note = '', copyFor?: string): string {
    const copy = copyFor === undefined ? '' : `: for app ${copyFor}`;
    return safeComment(`${this.shortId(ruleId, copyFor)} ${at ? `${at.file}:${at.line} ` : ''}${ruleId}${copy}${note}`);
  }

  private warn(at: Origin, message: string): void {
    if (!this.warnings.some((w) => w.message === message)) this.warnings.push({ severity: 'warning', at, message });
  }
}

/** Whether a cgroup glob can match a name nft cannot carry: only through a wildcard, or written out so itself. */
function mayMatchUnnamed(glob: string): boolean {
  return /[*?]/.test(glob) || !nftCanName(glob);
}

/** The map from an app's tag to the chain replaying its rules for packets without an owner (ownerlessReplay). */
const OWNERLESS_MAP = 'ownerless_tags';

/** What kind of nft rules a policy rule becomes (ruleDecls). */
interface RuleForm {
  /** An app's rule: its conntrack tag, written where it lets a packet out (allowTail). */
  readonly tag?: number | undefined;
  /** A global rule's copy for that app (appsWithOwnGlobalDeny), with its own short id and log chain, looking up the sets the rule itself declared. */
  readonly copyFor?: string;
  /** An app's rule for a packet without an owner on its connection (ownerlessReplay), looking up its own sets: an allow accepts, a deny returns. */
  readonly replay?: boolean;
  /** A rule of the global deny list itself (denyVerdict). */
  readonly listed?: boolean;
}

/** The prefix of the sets an app's rule declares. */
function appSetPrefix(app: App, r: Rule): string {
  return `a_${app.name}_${r.id.split('/').pop()}`;
}

/** The chain of an app's own copy of the global deny list (appsWithOwnGlobalDeny). */
function globalDenyChain(app: string): string {
  return `global_deny_app_${app}`;
}

/**
 * Gives the ids from `from` to `to` that nobody holds yet to `owner`, and
 * returns the parts others (or the same owner) held before. What is given
 * never overlaps what was: nft refuses overlapping intervals in a map.
 */
function claimIds(table: IdClaims, from: number, to: number, target: Verdict, owner: string): { from: number; to: number; owner: string }[] {
  const taken: { from: number; to: number; owner: string }[] = [];
  if (from === to) {
    const point = table.points.get(from);
    if (point) taken.push({ from, to, owner: point.owner });
  } else {
    for (const [id, point] of table.points) if (id >= from && id <= to) taken.push({ from: id, to: id, owner: point.owner });
  }
  for (const range of table.ranges)
    if (range.from <= to && range.to >= from) taken.push({ from: Math.max(range.from, from), to: Math.min(range.to, to), owner: range.owner });
  taken.sort((a, b) => a.from - b.from);
  let next = from;
  const give = (end: number): void => {
    if (next > end) return;
    if (next === end) table.points.set(next, { target, owner });
    else table.ranges.push({ from: next, to: end, target, owner });
  };
  for (const part of taken) {
    give(part.from - 1);
    next = Math.max(next, part.to + 1);
  }
  give(to);
  return taken.filter((part) => part.owner !== owner);
}

/** A dispatch's map entries at one cgroup depth, made when first needed. */
function cgroupLevel(d: Dispatch, level: number): LevelEntries {
  let entry = d.cgroupLevels.get(level);
  if (!entry) {
    entry = { elements: [], verdicts: [], claimed: new Map<string, string>() };
    d.cgroupLevels.set(level, entry);
  }
  return entry;
}

/**
 * What the kernel's MLD reports, and apart from them its IGMP reports, may
 * carry on average, and after a quiet minute at once: the bound of the
 * channel that group addresses chosen by a joining process are (README,
 * threat model).
 */
export const REPORT_BYTES_PER_SECOND = 256;
export const REPORT_BURST_BYTES = 16384;

/** The IPv6 next-header number of a routing header. */
const IPPROTO_ROUTING = 43;

/** The constant sets of the DNS rules (dnsRules), named as protocolMatch names them, so that a policy rule with the same ones shares them. */
const DNS_PROTOCOLS_SET = 'proto_tcp_udp';
/** Uids a rule's log meter tells apart at once. */
const LOG_METER_SIZE = 4096;
/**
 * Uids the meter of a global rule's copy for one app (appsWithOwnGlobalDeny)
 * tells apart: an app chosen by cgroup is a unit's or a user's, whose
 * processes run as a few uids. Smaller, because a user can send from
 * thousands of subordinate uids into every copy its cgroups reach (its own
 * apps' globs), and each copy's meter is kernel memory of its own: eight
 * copies hold what one rule's meter holds.
 */
const COPY_LOG_METER_SIZE = 512;

/**
 * How long a uid keeps its meter slot after its last denied packet (s): at
 * least until its bucket has refilled, or an expired and re-added slot would
 * hand a slow rate (1/hour) a fresh burst; at most a day.
 */
function meterTimeout(count: number, per: 'second' | 'minute' | 'hour', burst: number): number {
  const seconds = { second: 1, minute: 60, hour: 3600 }[per];
  return Math.min(86_400, Math.max(120, Math.ceil((burst * seconds) / count)));
}
const DNS_PORTS_SET = `ports_${DNS_PORTS.join('_')}`;

/** Marks the policy digest in the first rule's comment. */
export const POLICY_MARK = 'policy sha256:';

/**
 * Appends "#" and 8 hex digits of the rule's own text to its comment, so a
 * live rule can be compared with a compiled one by comment alone: nft lists
 * rules back in a different, normalised form, and the comment is the one
 * thing it keeps verbatim.
 */
function fingerprintRules(chain: ChainDecl): ChainDecl {
  return {
    ...chain,
    rules: chain.rules.map((r) => {
      const fingerprint = createHash('sha256').update(chain.name).update('\0').update(JSON.stringify(r.expr)).digest('hex').slice(0, 8);
      const base = safeText(r.comment ?? '', 128 - fingerprint.length - 2);
      return { ...r, comment: `${base} #${fingerprint}`.trim() };
    }),
  };
}

/**
 * Ports sorted, with duplicates and overlapping or adjacent ranges joined:
 * nft refuses overlapping intervals in a named set (`ports: [8000-8100,
 * 8080]`), and the same ports must give the same set name.
 */
function joinPortRanges(ports: readonly PortRange[]): PortRange[] {
  const joined: PortRange[] = [];
  for (const port of [...ports].sort((a, b) => a.from - b.from || a.to - b.to)) {
    const last = joined.at(-1);
    if (last && port.from <= last.to + 1) joined[joined.length - 1] = { from: last.from, to: Math.max(last.to, port.to) };
    else joined.push(port);
  }
  return joined;
}

/** A prefix length shared by this many networks of a rule gets a hash set of its own. */
const HASHED_GROUP_MIN = 1024;
/** At most this many such sets per rule and family: each is one more lookup per packet. */
const HASHED_GROUPS_MAX = 4;

/**
 * Big lists are mostly a few prefix lengths (/24 and /32, /48 and /64). The
 * networks of a length shared by many go to a hash set looked up under that
 * length's mask — one hash lookup, where an interval set of 100,000 entries
 * costs a binary search per packet (3 % of new connections per second, and
 * an interval set is slower to load; bench/README.md). The rest stay in one
 * interval set. A packet is matched by both as by one interval set: the
 * networks are canonical (host bits clear), so masking the destination to a
 * length and looking it up is membership in some network of that length.
 */
function splitByPrefix(networks: readonly Network[]): { hashed: [number, Network[]][]; rest: Network[] } {
  const byPrefix = new Map<number, Network[]>();
  for (const net of networks) {
    const group = byPrefix.get(net.prefix);
    if (group) group.push(net);
    else byPrefix.set(net.prefix, [net]);
  }
  const hashed = [...byPrefix]
    .filter(([, nets]) => nets.length >= HASHED_GROUP_MIN)
    .sort(([pa, a], [pb, b]) => b.length - a.length || pb - pa)
    .slice(0, HASHED_GROUPS_MAX)
    .sort(([pa], [pb]) => pb - pa);
  const taken = new Set(hashed.map(([prefix]) => prefix));
  return { hashed, rest: networks.filter((net) => !taken.has(net.prefix)) };
}

const listDigests = new WeakMap<NameList, string>();

/** A list's names by content, once per loaded list (the tracking list has 143,876). */
function listDigest(list: NameList | undefined): string {
  if (!list) return '';
  let digest = listDigests.get(list);
  if (digest === undefined) {
    digest = createHash('sha256').update(list.names.joined()).update('\0').update(list.suffixes.joined()).digest('hex');
    listDigests.set(list, digest);
  }
  return digest;
}

function networkElement(net: Network): Element {
  return net.prefix === (net.family === 4 ? 32 : 128) ? net.address : { prefix: { addr: net.address, len: net.prefix } };
}

/** Set and chain names come from app names and indices; a clash would silently merge two rules' sets. */
function assertUniqueNames(ruleset: Ruleset): void {
  const seen = new Set<string>();
  for (const name of [...ruleset.sets.map((s) => `set ${s.name}`), ...ruleset.chains.map((c) => `chain ${c.name}`)]) {
    if (seen.has(name)) throw new Error(`internal: the compiled table names ${name} twice`);
    seen.add(name);
  }
}

function comment(at: Origin | undefined, id: string): string {
  return safeComment(at ? `${at.file}:${at.line} ${id}` : id);
}

/** A statement that writes or reads the connection's mark (ct-mark.ts). */
function touchesCtMark(s: Statement): boolean {
  return 'mangle' in s || ('match' in s && JSON.stringify(s.match.left).includes('{"ct":{"key":"mark"}}'));
}

function isCtDirectionMatch(s: Statement): boolean {
  return 'match' in s && JSON.stringify(s.match.left) === '{"ct":{"key":"direction"}}';
}
