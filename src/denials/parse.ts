/**
 * NFLOG datagrams into denial events: the prefix's short rule id, the
 * socket's owner, and the destination read from the copied L3/L4 headers.
 * Whatever the bytes, the result is events and a count of what could not be
 * read — never a throw: a malformed packet message costs one `unparsed`,
 * a malformed datagram (bad netlink framing) one per datagram.
 */
import { formatGroups } from '../policy/destination.js';
import { NlmsgType, parseAttributes, parseMessages } from '../system/netlink.js';
import { parseLogPrefix } from '../compile/log-prefix.js';
import { NFULNL_MSG_PACKET } from './nflog.js';

/** One logged packet, as the kernel told it. */
export interface DenialEvent {
  readonly shortId: string;
  readonly uid: number | undefined;
  readonly gid: number | undefined;
  readonly family: 4 | 6;
  readonly protocol: string;
  readonly address: string;
  readonly port: number | undefined;
  /** The group's own sequence number (NFULA_SEQ), when the kernel sent one. */
  readonly seq: number | undefined;
}

export interface ParsedDatagram {
  readonly events: DenialEvent[];
  /** Packet messages (or whole datagrams) that could not be read. */
  readonly unparsed: number;
  /** The socket overran: the kernel says so with NLMSG_OVERRUN or an error message carrying ENOBUFS. */
  readonly overruns: number;
}

const Nfula = { PacketHdr: 1, Payload: 9, Prefix: 10, Uid: 11, Seq: 12, Gid: 14 } as const;
const ETH_P_IP = 0x0800;
const ETH_P_IPV6 = 0x86dd;
const NFPROTO_IPV4 = 2;
const NFPROTO_IPV6 = 10;
const ENOBUFS = 105;

const PROTOCOLS: ReadonlyMap<number, string> = new Map([
  [1, 'icmp'],
  [6, 'tcp'],
  [17, 'udp'],
  [58, 'icmpv6'],
  [132, 'sctp'],
  [136, 'udplite'],
]);
/** Protocols whose header starts with source and destination port. */
const WITH_PORTS = new Set([6, 17, 132, 136]);
/** IPv6 extension headers walked to reach the transport header (ESP ends the walk: what follows is encrypted). */
const HOP_BY_HOP = 0;
const ROUTING = 43;
const FRAGMENT = 44;
const AH = 51;
const DEST_OPTS = 60;

const protocolName = (n: number): string => PROTOCOLS.get(n) ?? String(n);

export function parseDatagram(datagram: Uint8Array): ParsedDatagram {
  const events: DenialEvent[] = [];
  let unparsed = 0;
  let overruns = 0;
  let messages;
  try {
    messages = parseMessages(datagram);
  } catch {
    return { events, unparsed: 1, overruns };
  }
  for (const message of messages) {
    if (message.type === NlmsgType.Overrun) {
      overruns++;
      continue;
    }
    if (message.type === NlmsgType.Error) {
      if (message.payload.length >= 4 && message.payload.readInt32LE(0) === -ENOBUFS) overruns++;
      continue;
    }
    if (message.type !== NFULNL_MSG_PACKET) continue;
    const event = parsePacket(message.payload);
    if (event) events.push(event);
    else unparsed++;
  }
  return { events, unparsed, overruns };
}

/** One NFULNL_MSG_PACKET payload (nfgenmsg, then attributes), or undefined when it cannot be read. */
export function parsePacket(payload: Buffer): DenialEvent | undefined {
  if (payload.length < 4) return undefined;
  const nfFamily = payload.readUInt8(0);
  let attributes;
  try {
    attributes = parseAttributes(payload.subarray(4));
  } catch {
    return undefined;
  }
  const prefix = attributes.get(Nfula.Prefix);
  const shortId = prefix === undefined ? undefined : parseLogPrefix(prefix.toString('latin1'));
  if (shortId === undefined) return undefined;
  const packet = attributes.get(Nfula.Payload);
  if (packet === undefined) return undefined;
  const header = attributes.get(Nfula.PacketHdr);
  const hwProtocol = header !== undefined && header.length >= 2 ? header.readUInt16BE(0) : undefined;
  // The family, by the hardware protocol when the kernel gave one, else by the nfgenmsg family, else by the IP version nibble.
  const version = packet.length > 0 ? packet.readUInt8(0) >> 4 : 0;
  const family =
    hwProtocol === ETH_P_IP
      ? 4
      : hwProtocol === ETH_P_IPV6
        ? 6
        : nfFamily === NFPROTO_IPV4
          ? 4
          : nfFamily === NFPROTO_IPV6
            ? 6
            : version === 4
              ? 4
              : version === 6
                ? 6
                : 0;
  if (family === 0 || version !== family) return undefined;
  const destination = family === 4 ? ipv4(packet) : ipv6(packet);
  if (destination === undefined) return undefined;
  return {
    shortId,
    uid: u32(attributes.get(Nfula.Uid)),
    gid: u32(attributes.get(Nfula.Gid)),
    family,
    protocol: protocolName(destination.protocol),
    address: destination.address,
    port: destination.port,
    seq: u32(attributes.get(Nfula.Seq)),
  };
}

const u32 = (value: Buffer | undefined): number | undefined => (value !== undefined && value.length === 4 ? value.readUInt32BE(0) : undefined);

interface Destination {
  readonly address: string;
  readonly protocol: number;
  readonly port: number | undefined;
}

function ipv4(packet: Buffer): Destination | undefined {
  if (packet.length < 20) return undefined;
  const headerLength = (packet.readUInt8(0) & 0x0f) * 4;
  if (headerLength < 20) return undefined;
  const protocol = packet.readUInt8(9);
  const address = `${packet[16]}.${packet[17]}.${packet[18]}.${packet[19]}`;
  // Only the first fragment carries the ports.
  const fragmentOffset = packet.readUInt16BE(6) & 0x1fff;
  return { address, protocol, port: fragmentOffset === 0 ? portAt(packet, headerLength, protocol) : undefined };
}

function ipv6(packet: Buffer): Destination | undefined {
  if (packet.length < 40) return undefined;
  const address = ipv6Text(packet.subarray(24, 40));
  let next = packet.readUInt8(6);
  let offset = 40;
  let first = true;
  // Each extension header is at least 8 bytes, so the walk ends within the copy range.
  while (next === HOP_BY_HOP || next === ROUTING || next === FRAGMENT || next === DEST_OPTS || next === AH) {
    if (offset + 8 > packet.length) return { address, protocol: next, port: undefined };
    const following = packet.readUInt8(offset);
    if (next === FRAGMENT) {
      first = (packet.readUInt16BE(offset + 2) & 0xfff8) === 0;
      offset += 8;
    } else if (next === AH) offset += (packet.readUInt8(offset + 1) + 2) * 4;
    else offset += (packet.readUInt8(offset + 1) + 1) * 8;
    next = following;
  }
  return { address, protocol: next, port: first ? portAt(packet, offset, next) : undefined };
}

function portAt(packet: Buffer, offset: number, protocol: number): number | undefined {
  if (!WITH_PORTS.has(protocol) || offset + 4 > packet.length) return undefined;
  return packet.readUInt16BE(offset + 2);
}

/** RFC 5952 text: lower case, the longest run of two or more zero groups as "::". */
export function ipv6Text(bytes: Buffer): string {
  const groups: number[] = [];
  for (let i = 0; i < 16; i += 2) groups.push(bytes.readUInt16BE(i));
  // IPv4-mapped, as Node and nft write it (a policy's v4 rules never see one; the kernel drops it).
  if (groups.slice(0, 5).every((g) => g === 0) && groups[5] === 0xffff) return `::ffff:${bytes[12]}.${bytes[13]}.${bytes[14]}.${bytes[15]}`;
  return formatGroups(6, groups);
}
