/**
 * A denial as egressd keeps it: who tried, where to, which rule stopped it,
 * when and how often. Exactly these fields and nothing more — never a
 * payload, a URL or a file name. The reader builds records from NFLOG
 * events (aggregating the same identity, destination and rule within a
 * window), the store keeps them, the journal, D-Bus and `egressctl denials`
 * show them. Every field is named in README's "What a denial record holds".
 */
import type { RuleKind } from '../compile/rule-ids.js';

export interface DenialRecord {
  /** First and last packet of the aggregate, milliseconds since the epoch. */
  readonly firstSeen: number;
  readonly lastSeen: number;
  /** Packets the kernel logged for this identity, destination and rule within the window. */
  readonly count: number;
  /** The rule's short id from the log prefix ("r1a2b3c4d"), and what rules.json says of it. */
  readonly shortId: string;
  /** The policy's rule id ("app/firefox/2", "global/telemetry/0", "sd/offline"); undefined when rules.json does not know the short id. */
  readonly ruleId: string | undefined;
  readonly kind: RuleKind | undefined;
  /** Where the rule is written, relative to the policy directory. */
  readonly file: string | undefined;
  readonly line: number | undefined;
  /** The app or system domain the rule belongs to; a global rule's copy its app; for a rule of no app, the sender's app when its uid says it (attribute.ts). */
  readonly app: string | undefined;
  readonly domain: string | undefined;
  /** The sending socket's owner, as the kernel logged it (absent for orphaned sockets). */
  readonly uid: number | undefined;
  readonly gid: number | undefined;
  /** "tcp", "udp", "icmp", "icmpv6", or the protocol number. */
  readonly protocol: string;
  readonly family: 4 | 6;
  readonly address: string;
  /** Destination port for tcp, udp, sctp, udplite; undefined otherwise. */
  readonly port: number | undefined;
  /**
   * The name the address was learned from (the resolver's memory), when
   * known: one the sender's uid itself looked up when there is one.
   */
  readonly name: string | undefined;
  /**
   * Who looked `name` up: "sender", the sending uid itself; "others", only
   * other uids did (any user's lookup teaches the memory an address's name,
   * and a user may point a name of its own at any address). A name of
   * others' is kept for the audit view only: it is never sent to the
   * user's agent nor written by an Allow (the address is). Undefined
   * without a name.
   */
  readonly nameAskedBy: NameAskedBy | undefined;
}

export type NameAskedBy = 'sender' | 'others';

/** The identity, destination and rule that make one aggregate. */
export function aggregateKey(r: Pick<DenialRecord, 'shortId' | 'uid' | 'protocol' | 'address' | 'port'>): string {
  return `${r.shortId}|${r.uid ?? '-'}|${r.protocol}|${r.address}|${r.port ?? '-'}`;
}
