import { isIPv4, isIPv6 } from 'node:net';
import type { ChainDecl, Element, Expr, RuleDecl, Ruleset, SetDecl, Statement, Verdict } from '../../src/compile/ruleset.js';

/**
 * A test-only interpreter of the compiled model: what the kernel does with
 * one packet on the output hook of `table inet egressd`. Written from nft's
 * semantics, not from the compiler, so that it can disagree with `explain`:
 * - `ip daddr` / `ip6 daddr` match only packets of that family (an inet
 *   table adds the nfproto dependency): an ip6 packet to ::ffff:192.0.2.5
 *   never meets an `ip daddr` set.
 * - `meta oif "lo"` is about the interface, not the address.
 * - `rt type` is the type of an IPv6 packet's routing header; a packet
 *   without one (every IPv4 packet) breaks the rule, whatever the operator.
 * - a verdict-map lookup that finds nothing, like any failed match, ends the
 *   rule and goes on with the next one; `socket cgroupv2 level N` is the
 *   socket cgroup's ancestor N levels down (none if the cgroup is shallower).
 * - jump returns, goto does not; the end of a regular chain returns; the end
 *   of the base chain applies its policy.
 * - counter, log and limit decide nothing: packets are taken to come within
 *   every rate (a limit over its rate makes its rule fall through; the
 *   compiler keeps those in rules that only log), so `limit rate over`
 *   never matches.
 * - `ct mark set` writes the connection's mark, which the outcome reports;
 *   a `ct` key loads the packet's conntrack entry (every packet has one).
 * Sets hold what the model holds: DNS sets are empty until the resolver runs.
 */

export interface Packet {
  readonly oif: 'lo' | 'eth0';
  readonly family: 4 | 6;
  readonly daddr: string;
  readonly l4proto: 'tcp' | 'udp' | 'icmp' | 'ipv6-icmp' | 'igmp';
  /** tcp and udp only. */
  readonly dport?: number;
  /** tcp and udp only; absent: the ephemeral port a connection that this socket opened leaves from (EPHEMERAL_PORT). */
  readonly sport?: number;
  /** Absent: the address the kernel picks for the destination (LOCAL_SOURCE: 127.0.0.1 or ::1 on lo, the host's address elsewhere). */
  readonly saddr?: string;
  /** Undefined: the socket has no owner (nft's skuid/skgid match nothing). */
  readonly skuid?: number;
  readonly skgid?: number;
  /** false for a packet from a socket not yet full (a SYN-ACK's request socket): `socket` expressions do not load; `meta skuid` still reads its listener's. */
  readonly fullSocket?: boolean;
  /** true for a packet sent from no socket at all (a SYN cookie's SYN-ACK): nothing about a socket loads, `socket transparent` included. */
  readonly noSocket?: boolean;
  /** The socket's cgroup relative to the cgroup2 root, "" for the root. */
  readonly cgroup: string;
  readonly ct: 'new' | 'established';
  /** The conntrack entry's mark (all 32 bits) as the packet finds it; 0 when absent. */
  readonly ctMark?: number;
  /** Which way the packet goes on its conntrack entry; 'original' when absent. */
  readonly ctDirection?: 'original' | 'reply';
  /** ipv6-icmp only. */
  readonly icmpv6Type?: string;
  readonly hoplimit?: number;
  /** IPv6 only: the type of the packet's routing header; undefined for none. */
  readonly routingHeader?: number;
  /** The packet's mark (`meta mark`: its socket's SO_MARK); 0 when absent. */
  readonly mark?: number;
  /** tcp only; absent: a connection's first packet (SYN) where `ct` is new, an ACK where established. */
  readonly tcpFlags?: readonly TcpFlag[];
}

export type TcpFlag = keyof typeof TCP_FLAG_BITS;
const TCP_FLAG_BITS = { fin: 0x01, syn: 0x02, rst: 0x04, psh: 0x08, ack: 0x10, urg: 0x20 } as const;

export interface Outcome {
  readonly verdict: 'accept' | 'drop';
  /** The rule that gave the verdict, or undefined for the base chain's policy. */
  readonly rule: RuleDecl | undefined;
  readonly chain: string;
  /** Chains entered, in order: for failure messages. */
  readonly path: readonly string[];
  /** The conntrack entry's mark after the packet (`ct mark set` writes it). */
  readonly ctMark: number;
  /** The rules that jumped or went to path[1], path[2], …, each with its chain. */
  readonly via: readonly { readonly chain: string; readonly rule: RuleDecl }[];
}

/** The source port of a packet that names none: one of the kernel's ephemeral ports (net.ipv4.ip_local_port_range), never a service's. */
export const EPHEMERAL_PORT = 40000;
/** The source address of a packet that names none, by family and interface. */
const LOCAL_SOURCE = { lo: { 4: '127.0.0.1', 6: '::1' }, eth0: { 4: '192.0.2.10', 6: '2001:db8::10' } } as const;

/** IANA protocol numbers, as `ip6 nexthdr` reads them. */
const NEXT_HEADER: Readonly<Record<string, number>> = { tcp: 6, udp: 17, 'ipv6-icmp': 58, udplite: 136, sctp: 132, igmp: 2, icmp: 1 };

export function evaluate(ruleset: Ruleset, packet: Packet): Outcome {
  const chains = new Map(ruleset.chains.map((c) => [c.name, c]));
  const sets = new Map(ruleset.sets.map((s) => [s.name, s]));
  const base = ruleset.chains.find((c) => c.hook);
  if (!base?.hook) throw new Error('interpreter: no base chain');
  const path: string[] = [base.name];
  const via: { chain: string; rule: RuleDecl }[] = [];
  // Return addresses: the chain and the index of the rule after the jump.
  const stack: { chain: ChainDecl; next: number }[] = [];
  let chain: ChainDecl = base;
  let index = 0;
  const entry = { mark: packet.ctMark ?? 0 };
  for (let steps = 0; steps < 10_000; steps++) {
    if (index >= chain.rules.length) {
      const back = stack.pop();
      if (!back) return { verdict: base.hook.policy === 'accept' ? 'accept' : 'drop', rule: undefined, chain: base.name, path, ctMark: entry.mark, via };
      ({ chain, next: index } = back);
      continue;
    }
    const rule = chain.rules[index]!;
    const verdict = runRule(rule, packet, sets, entry);
    index++;
    if (verdict === undefined) continue;
    if ('accept' in verdict) return { verdict: 'accept', rule, chain: chain.name, path, ctMark: entry.mark, via };
    if ('drop' in verdict) return { verdict: 'drop', rule, chain: chain.name, path, ctMark: entry.mark, via };
    if ('return' in verdict) {
      const back = stack.pop();
      if (!back) return { verdict: base.hook.policy === 'accept' ? 'accept' : 'drop', rule: undefined, chain: base.name, path, ctMark: entry.mark, via };
      ({ chain, next: index } = back);
      continue;
    }
    const target = 'jump' in verdict ? verdict.jump.target : verdict.goto.target;
    const next = chains.get(target);
    if (!next) throw new Error(`interpreter: no chain ${target}`);
    if ('jump' in verdict) stack.push({ chain, next: index });
    path.push(target);
    via.push({ chain: chain.name, rule });
    chain = next;
    index = 0;
  }
  throw new Error('interpreter: a loop among the chains');
}

/** A rule's verdict for the packet, or undefined when it does not decide (a match failed, or it has no verdict). */
function runRule(rule: RuleDecl, packet: Packet, sets: ReadonlyMap<string, SetDecl>, entry: { mark: number }): Verdict | undefined {
  for (const statement of rule.expr) {
    const result = runStatement(statement, { ...packet, ctMark: entry.mark }, sets, entry);
    if (result === 'break') return undefined;
    if (result !== 'continue') return result;
  }
  return undefined;
}

function runStatement(s: Statement, packet: Packet, sets: ReadonlyMap<string, SetDecl>, entry: { mark: number }): Verdict | 'continue' | 'break' {
  if ('match' in s) {
    const { op, left, right } = s.match;
    const value = load(left, packet);
    if (value === undefined) return 'break';
    const hit = op === 'in' ? flagsMatch(value, right) : Array.isArray(right) ? flagBitsEqual(value, right) : contains(right, value, sets);
    return (op === '!=' ? !hit : hit) ? 'continue' : 'break';
  }
  if ('vmap' in s) {
    const value = load(s.vmap.key, packet);
    if (value === undefined) return 'break';
    const map = setNamed(s.vmap.data, sets);
    const at = map.elements.findIndex((element) => elementMatches(element, value, map));
    return at < 0 ? 'break' : map.verdicts![at]!;
  }
  // A log meter: keyed by the owner's uid, so a packet without one breaks the rule; its limit, like any, is taken as under its rate.
  if ('set' in s) return load(s.set.elem, packet) === undefined ? 'break' : 'continue';
  if ('limit' in s && 'inv' in s.limit) return 'break';
  if ('counter' in s || 'limit' in s || 'log' in s) return 'continue';
  if ('mangle' in s) {
    const value = load(s.mangle.value, packet);
    if (value?.kind !== 'number') throw new Error(`interpreter: ct mark set to ${JSON.stringify(s.mangle.value)}`);
    entry.mark = value.value;
    return 'continue';
  }
  return s;
}

/** What the packet carries for an expression: undefined where nft finds nothing (and the rule breaks). */
function load(expr: Expr, packet: Packet): Value | undefined {
  if (typeof expr !== 'object' || Array.isArray(expr)) throw new Error(`interpreter: ${JSON.stringify(expr)} is not a key`);
  if ('meta' in expr) {
    switch (expr.meta.key) {
      case 'oif':
        return { kind: 'text', text: packet.oif };
      case 'l4proto':
        return { kind: 'text', text: packet.l4proto };
      case 'skuid':
        return packet.skuid === undefined ? undefined : { kind: 'number', value: packet.skuid };
      case 'skgid':
        return packet.skgid === undefined ? undefined : { kind: 'number', value: packet.skgid };
      case 'nfproto':
        return { kind: 'text', text: packet.family === 4 ? 'ipv4' : 'ipv6' };
      case 'mark':
        return { kind: 'number', value: packet.mark ?? 0 };
    }
  }
  if ('payload' in expr) {
    const { protocol, field } = expr.payload;
    if (protocol === 'ip' || protocol === 'ip6') {
      if (packet.family !== (protocol === 'ip' ? 4 : 6)) return undefined;
      if (field === 'hoplimit') return packet.hoplimit === undefined ? undefined : { kind: 'number', value: packet.hoplimit };
      // The packets here carry no extension header but a routing header, which comes first.
      if (field === 'nexthdr') return { kind: 'number', value: packet.routingHeader !== undefined ? 43 : (NEXT_HEADER[packet.l4proto] ?? 255) };
      const address = field === 'saddr' ? (packet.saddr ?? LOCAL_SOURCE[packet.oif][packet.family]) : packet.daddr;
      return { kind: 'address', family: packet.family, value: addressBits(packet.family, address) };
    }
    if (protocol === 'icmpv6') return packet.l4proto === 'ipv6-icmp' && packet.icmpv6Type ? { kind: 'text', text: packet.icmpv6Type } : undefined;
    if (protocol === 'tcp' && packet.l4proto !== 'tcp') return undefined;
    if (field === 'flags') {
      const flags = packet.tcpFlags ?? (packet.ct === 'new' ? ['syn'] : ['ack']);
      return { kind: 'number', value: flags.reduce((bits, flag) => bits | TCP_FLAG_BITS[flag], 0) };
    }
    // The compiler pairs `th dport` with an l4proto match of tcp or udp; a packet without ports has none.
    if (packet.dport === undefined) return undefined;
    return { kind: 'number', value: field === 'sport' ? (packet.sport ?? EPHEMERAL_PORT) : packet.dport };
  }
  if ('socket' in expr) {
    const socket = expr.socket;
    if (packet.noSocket) return undefined;
    // Any socket has a transparent flag, a request socket's too.
    if (socket.key === 'transparent') return { kind: 'number', value: 0 };
    // `socket` reads a full socket only otherwise: a request socket's SYN-ACK has neither cgroup nor mark.
    if (packet.fullSocket === false) return undefined;
    if (socket.key !== 'cgroupv2') return { kind: 'number', value: 0 };
    const segments = packet.cgroup.split('/').filter(Boolean);
    if (segments.length < socket.level) return undefined;
    return { kind: 'text', text: segments.slice(0, socket.level).join('/') };
  }
  if ('ct' in expr) {
    if (expr.ct.key === 'mark') return { kind: 'number', value: packet.ctMark ?? 0 };
    if (expr.ct.key === 'direction') return { kind: 'text', text: packet.ctDirection ?? 'original' };
    return { kind: 'text', text: packet.ct };
  }
  if ('exthdr' in expr) return packet.family === 6 && packet.routingHeader !== undefined ? { kind: 'number', value: packet.routingHeader } : undefined;
  if ('&' in expr || '|' in expr) {
    const [left, operand] = '&' in expr ? expr['&'] : expr['|'];
    const inner = load(left, packet);
    if (inner === undefined) return undefined;
    if (inner.kind === 'number') {
      // 32-bit marks: JavaScript's bitwise operators are signed, so back to unsigned.
      const bits = typeof operand !== 'string' ? tcpFlagBits(operand) : operand in TCP_FLAG_BITS ? TCP_FLAG_BITS[operand as TcpFlag] : hexNumber(operand);
      return { kind: 'number', value: ('&' in expr ? inner.value & bits : inner.value | bits) >>> 0 };
    }
    if (inner.kind !== 'address' || '|' in expr || typeof operand !== 'string') throw new Error(`interpreter: ${JSON.stringify(expr)} on ${inner.kind}`);
    return { ...inner, value: inner.value & addressBits(inner.family, operand) };
  }
  throw new Error(`interpreter: cannot load ${JSON.stringify(expr)}`);
}

/** A list of TCP flags as nft's JSON writes them (`tcp flags & (syn | ack) == syn | ack`): their bits together. */
function tcpFlagBits(flags: readonly string[]): number {
  return flags.reduce((bits, flag) => {
    if (!(flag in TCP_FLAG_BITS)) throw new Error(`interpreter: ${flag} is not a TCP flag`);
    return bits | TCP_FLAG_BITS[flag as TcpFlag];
  }, 0);
}

/** `==` against a list of flags: exactly those bits (the left side masked them already). */
function flagBitsEqual(value: Value, flags: readonly string[]): boolean {
  if (value.kind !== 'number') throw new Error('interpreter: a list of flags compared with a value that is not a number');
  return value.value === tcpFlagBits(flags);
}

function hexNumber(text: string): number {
  if (!/^0x[0-9a-f]{1,8}$/i.test(text)) throw new Error(`interpreter: ${text} is not a 32-bit hex number`);
  return Number.parseInt(text.slice(2), 16);
}

type Value = { kind: 'text'; text: string } | { kind: 'number'; value: number } | { kind: 'address'; family: 4 | 6; value: bigint };

function flagsMatch(value: Value, right: Expr): boolean {
  if (!Array.isArray(right) || value.kind !== 'text') throw new Error('interpreter: a flag test needs a list of flags');
  return (right as readonly string[]).includes(value.text);
}

/** Does the right-hand side (a literal, an anonymous set or @set) hold the value? */
function contains(right: Expr, value: Value, sets: ReadonlyMap<string, SetDecl>): boolean {
  if (typeof right === 'string' && right.startsWith('@')) {
    const set = setNamed(right, sets);
    return set.elements.some((element) => elementMatches(element, value, set));
  }
  if (typeof right === 'object' && !Array.isArray(right) && 'set' in right) return right.set.some((element) => elementMatches(element, value, undefined));
  return elementMatches(right as Element, value, undefined);
}

function setNamed(reference: string, sets: ReadonlyMap<string, SetDecl>): SetDecl {
  const set = sets.get(reference.replace(/^@/, ''));
  if (!set) throw new Error(`interpreter: no set ${reference}`);
  return set;
}

function elementMatches(element: Element, value: Value, set: SetDecl | undefined): boolean {
  if (set && typeof set.key === 'object' && value.kind !== 'text') return false;
  switch (value.kind) {
    case 'text':
      return typeof element === 'string' && element === value.text;
    case 'number':
      if (typeof element === 'number') return element === value.value;
      if (typeof element === 'string') return hexNumber(element) === value.value;
      if (typeof element === 'object' && 'range' in element) return value.value >= element.range[0] && value.value <= element.range[1];
      return false;
    case 'address': {
      if (set && set.key !== (value.family === 4 ? 'ipv4_addr' : 'ipv6_addr'))
        throw new Error(`interpreter: an IPv${value.family} address looked up in ${set.name} (${JSON.stringify(set.key)})`);
      if (typeof element === 'string') return familyOf(element) === value.family && addressBits(value.family, element) === value.value;
      if (typeof element === 'object' && 'prefix' in element) {
        const { addr, len } = element.prefix;
        if (familyOf(addr) !== value.family) return false;
        const bits = value.family === 4 ? 32 : 128;
        const mask = len === 0 ? 0n : ((1n << BigInt(len)) - 1n) << BigInt(bits - len);
        return (value.value & mask) === addressBits(value.family, addr);
      }
      return false;
    }
  }
}

function familyOf(text: string): 4 | 6 | undefined {
  return isIPv4(text) ? 4 : isIPv6(text) ? 6 : undefined;
}

/** An address (or netmask) as an integer of 32 or 128 bits; an IPv4 tail in IPv6 text is two groups. */
export function addressBits(family: 4 | 6, text: string): bigint {
  if (family === 4) {
    if (!isIPv4(text)) throw new Error(`interpreter: ${text} is not an IPv4 address`);
    return text.split('.').reduce((acc, octet) => (acc << 8n) | BigInt(octet), 0n);
  }
  if (!isIPv6(text)) throw new Error(`interpreter: ${text} is not an IPv6 address`);
  let hex = text;
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(hex);
  if (v4) {
    const bits = addressBits(4, v4[1]!);
    hex = `${hex.slice(0, v4.index)}${(bits >> 16n).toString(16)}:${(bits & 0xffffn).toString(16)}`;
  }
  const [head = '', tail] = hex.split('::');
  const headGroups = head ? head.split(':') : [];
  const tailGroups = tail ? tail.split(':') : [];
  const groups = tail === undefined ? headGroups : [...headGroups, ...new Array<string>(8 - headGroups.length - tailGroups.length).fill('0'), ...tailGroups];
  return groups.reduce((acc, group) => (acc << 16n) | BigInt(parseInt(group, 16)), 0n);
}
