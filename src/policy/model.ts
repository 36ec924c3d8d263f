/**
 * The policy after loading: files merged, references resolved, destinations
 * parsed, every part carrying the file:line it came from. The compiler and
 * `explain` read only this form.
 */
import type { CatalogueCategory } from './schema.js';
import type { NameTable } from './name-table.js';

/** A place in a policy file; `file` is relative to the policy directory. */
export interface Origin {
  readonly file: string;
  readonly line: number;
  readonly col: number;
}

export type Verdict = 'allow' | 'deny';
export type Protocol = 'tcp' | 'udp' | 'icmp';

export interface Network {
  readonly family: 4 | 6;
  readonly address: string;
  readonly prefix: number;
}

/**
 * How a process is recognised in the kernel. Units, slices, cgroup globs and
 * Flatpak ids all become cgroup globs at a fixed depth (`level`), because nft
 * matches `socket cgroupv2 level N` against one ancestor of the socket's cgroup.
 * A unit keeps its name too (`unit`): systemd is asked about it by that name.
 */
export type Selector =
  | { readonly kind: 'cgroup'; readonly glob: string; readonly level: number; readonly written: string; readonly unit?: string }
  | { readonly kind: 'user'; readonly user: string | number; readonly optional?: true }
  | { readonly kind: 'group'; readonly group: string | number; readonly optional?: true };

export interface Identity {
  readonly name: string;
  readonly selectors: readonly Selector[];
  readonly at: Origin;
}

export interface PortRange {
  readonly from: number;
  readonly to: number;
}

/** Destinations of one rule, expanded from names, lists, catalogue and CIDRs. */
export interface DestinationSet {
  readonly any: boolean;
  readonly names: readonly string[];
  readonly suffixes: readonly string[];
  /** Lists referenced as @name that hold names; those are matched through the list, not copied here. A list's networks are copied into `networks`. */
  readonly lists: readonly string[];
  readonly networks: readonly Network[];
  /** Catalogue entries this rule took names from, for `explain`. */
  readonly catalogueEntries: readonly string[];
  /**
   * The destinations as written, canonical ("example.org", "*.example.net",
   * "@list", "catalogue:telemetry", "192.0.2.0/24"), sorted: what the rule
   * names, unchanged when a list file or the catalogue behind it changes.
   * A rule's short id (compile/rule-ids.ts) is derived from it.
   */
  readonly written: readonly string[];
}

export interface Rule {
  /** Stable id carried into the kernel (log prefix, comment): "app/firefox/2", "deny/10-phone-home/0". */
  readonly id: string;
  readonly verdict: Verdict;
  readonly to: DestinationSet;
  /** Undefined: every port. */
  readonly ports: readonly PortRange[] | undefined;
  /** Undefined: every protocol. Ports without protocols mean tcp and udp. */
  readonly protocols: readonly Protocol[] | undefined;
  readonly log: boolean;
  readonly why: string | undefined;
  readonly at: Origin;
  /**
   * Deny rules with names only (undefined elsewhere): whether an address
   * learned for one of its names that also answers a name the rule does not
   * deny (a CDN's) is denied too ('deny', the default) or left out of the
   * rule's sets ('spare'), for everyone, whoever asked. The resolver reads
   * it when it fills the rule's sets.
   */
  readonly sharedAddresses?: 'deny' | 'spare';
  /** An `allowed:` entry's end (ms since the epoch, from its `until`): from then on apply leaves the rule out (policy/expiry.ts). */
  readonly until?: number;
}

export interface App {
  readonly name: string;
  readonly identities: readonly Identity[];
  readonly defaultVerdict: Verdict;
  readonly rules: readonly Rule[];
  readonly why: string | undefined;
  readonly at: Origin;
}

export interface SystemDomain {
  readonly name: string;
  readonly members: readonly Identity[];
  readonly why: string | undefined;
  readonly at: Origin;
}

export interface NameList {
  readonly name: string;
  /** Compact (a list may hold 100,000s): ask `has`, iterate only where every name is needed. */
  readonly names: NameTable;
  readonly suffixes: NameTable;
  /** Addresses and CIDRs from the list file; rules using the list match them directly. */
  readonly networks: readonly Network[];
  /** The list file relative to the policy directory, if it came from one. */
  readonly file: string | undefined;
  readonly at: Origin;
}

export interface CatalogueEntry {
  readonly id: string;
  readonly software: string;
  readonly reports: string;
  readonly category: CatalogueCategory;
  readonly names: readonly string[];
  readonly suffixes: readonly string[];
  readonly source: string;
  readonly at: Origin;
}

export interface TorSettings {
  readonly enabled: boolean;
  readonly socks: { readonly family: 4 | 6; readonly address: string; readonly port: number };
  readonly user: string | number;
  /** The policy said Tor's user may be missing on this machine (`{user: NAME, optional: true}`). */
  readonly userOptional: boolean;
  /** Where Tor's user was written; undefined for the default. */
  readonly userAt: Origin | undefined;
  readonly updaters: readonly Identity[];
  readonly at: Origin | undefined;
}

export interface LogSettings {
  readonly denials: boolean;
  readonly group: number;
  readonly rate: { readonly count: number; readonly per: 'second' | 'minute' | 'hour' };
  readonly burst: number;
}

/** egressd's resolver: where it listens, whom it asks, how long learned addresses stay, and who else may send DNS. */
export interface DnsSettings {
  /** Where the resolver listens (port 53). Default ['127.0.0.153', '::1']. */
  readonly listen: readonly string[];
  /** Upstream servers "ADDR" or "ADDR#PORT"; undefined = the machine's own (helper D's discovery). */
  readonly upstreams: readonly string[] | undefined;
  /** Set element timeout = answer TTL clamped into [ttlFloor, ttlCap] seconds (a second more where the TTL is within them: src/resolver/fill.ts). Defaults 60, 86400. */
  readonly ttlFloor: number;
  readonly ttlCap: number;
  /** What a globally denied name gets: NXDOMAIN (default), 0.0.0.0/:: ('null'), or the true answer ('true'). */
  readonly deniedAnswer: 'nxdomain' | 'null' | 'true';
  /** Only the resolver's own sockets (root's, carrying `mark`) may send udp/tcp 53 and 853 off the host. Default true. */
  readonly exclusive: boolean;
  /** The meta mark (SO_MARK) on the resolver's upstream sockets. Default 0x45444e53 ("EDNS"). */
  readonly mark: number;
}

export const DNS_DEFAULTS: DnsSettings = {
  listen: ['127.0.0.153', '::1'],
  upstreams: undefined,
  ttlFloor: 60,
  ttlCap: 86400,
  deniedAnswer: 'nxdomain',
  exclusive: true,
  mark: 0x45444e53,
};

/** The ports only the resolver may send to when `dns.exclusive`: DNS (udp, tcp), DNS-over-TLS (tcp) and DNS-over-QUIC (udp). */
export const DNS_PORTS: readonly number[] = [53, 853];

export interface Policy {
  readonly defaults: { readonly egress: Verdict; readonly log: LogSettings; readonly at: Origin | undefined };
  readonly lists: ReadonlyMap<string, NameList>;
  readonly catalogue: ReadonlyMap<string, CatalogueEntry>;
  readonly identities: ReadonlyMap<string, Identity>;
  readonly apps: readonly App[];
  readonly globalDeny: readonly Rule[];
  readonly systemDomains: readonly SystemDomain[];
  readonly tor: TorSettings;
  readonly dns: DnsSettings;
  /** The policy files in merge order, relative to the directory. */
  readonly files: readonly string[];
  /** sha256 over every policy file and list file (names and bytes): which policy this is. */
  readonly digest: string;
}

export const DEFAULT_LOG_GROUP = 7745;
