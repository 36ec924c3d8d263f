/**
 * The elements of `socket cgroupv2` maps, read from the kernel as ids.
 *
 * nft prints a cgroupv2 key as the cgroup's path, which it finds by walking
 * all of cgroupfs, stat'ing every entry, once per element (nftables 1.0.6,
 * datatype.c cgroupv2_get_path): measured here, 25 s to list a map of 200
 * elements beside 2,200 cgroups, and the walk grows with both. It aborts
 * a JSON listing outright on a path that is not UTF-8 (json.c:691). So the
 * listings egressd makes of its own table take these maps' elements from
 * here instead: one netlink dump per map (NFT_MSG_GETSETELEM), each element
 * its id (the number nft prints for a cgroup it cannot find) and its
 * verdict, as nft's JSON has them. Nothing is resolved to a path.
 */
import { endianness } from 'node:os';
import type { Verdict } from '../compile/ruleset.js';
import { EgressError, ErrorCode } from '../errors.js';
import { DUMP_INTERRUPTED_ERRNO, NetlinkError, NetlinkFamily, NlmFlag, openNetlink, type NetlinkSocket } from '../system/netlink.js';
import type { NftElemJson } from './types.js';

const NFNL_SUBSYS_NFTABLES = 10;
const NFT_MSG_GETSETELEM = 13;
const NFPROTO_INET = 1;
const NFTA_SET_ELEM_LIST_TABLE = 1;
const NFTA_SET_ELEM_LIST_SET = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS = 3;
const NFTA_LIST_ELEM = 1;
const NFTA_SET_ELEM_KEY = 1;
const NFTA_SET_ELEM_DATA = 2;
const NFTA_DATA_VALUE = 1;
const NFTA_DATA_VERDICT = 2;
const NFTA_VERDICT_CODE = 1;
const NFTA_VERDICT_CHAIN = 2;
const ENOENT = 2;
const DUMP_ATTEMPTS = 3;

/** What `nft -j` calls a `typeof socket cgroupv2 level N` key. */
export const CGROUP_KEY_TYPE = 'cgroupsv2';

/** Reads cgroup maps of one inet table; one netlink socket of this network namespace, open until `close`. */
export interface CgroupElementReader {
  /** The map's elements as `nft -j` lists them, keys as ids; null when there is no such map. */
  read(map: string): NftElemJson[] | null;
  close(): void;
}

export function openCgroupElementReader(table: string): CgroupElementReader {
  const socket = openNetlink(NetlinkFamily.Netfilter);
  return {
    read: (map) => readMap(socket, table, map),
    close: () => socket.close(),
  };
}

function readMap(socket: NetlinkSocket, table: string, map: string): NftElemJson[] | null {
  const payload = Buffer.concat([
    Buffer.from([NFPROTO_INET, 0, 0, 0]),
    attribute(NFTA_SET_ELEM_LIST_TABLE, cString(table)),
    attribute(NFTA_SET_ELEM_LIST_SET, cString(map)),
  ]);
  let answers;
  for (let attempt = 1; ; attempt++) {
    try {
      answers = socket.request((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NlmFlag.Dump, payload);
      break;
    } catch (error) {
      if (error instanceof NetlinkError && error.errno === ENOENT) return null;
      // Interrupted by a change to the map while it was dumped: a few more times, then the error stands.
      if (error instanceof NetlinkError && error.errno === DUMP_INTERRUPTED_ERRNO && attempt < DUMP_ATTEMPTS) continue;
      throw error;
    }
  }
  const elements: NftElemJson[] = [];
  for (const answer of answers) {
    // After the nfgenmsg header: the list's attributes.
    const list = attributes(answer.payload.subarray(4)).find((a) => a.type === NFTA_SET_ELEM_LIST_ELEMENTS);
    for (const item of list ? attributes(list.value) : []) {
      if (item.type !== NFTA_LIST_ELEM) continue;
      const parts = attributes(item.value);
      const key = valueOf(parts.find((p) => p.type === NFTA_SET_ELEM_KEY));
      if (key?.length !== 8) throw malformed(map, `a key of ${key?.length ?? 0} bytes, not a 64-bit cgroup id`);
      const id = endianness() === 'LE' ? key.readBigUInt64LE(0) : key.readBigUInt64BE(0);
      const shown = id <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(id) : String(id);
      const data = parts.find((p) => p.type === NFTA_SET_ELEM_DATA);
      elements.push(data === undefined ? shown : [shown, verdictOf(data.value, map)]);
    }
  }
  return elements;
}

function verdictOf(data: Buffer, map: string): Verdict {
  const verdict = attributes(data).find((a) => a.type === NFTA_DATA_VERDICT);
  if (verdict === undefined) throw malformed(map, 'an element whose data is no verdict');
  const parts = attributes(verdict.value);
  const code = parts.find((p) => p.type === NFTA_VERDICT_CODE)?.value;
  if (code?.length !== 4) throw malformed(map, 'a verdict without its code');
  const chain = parts.find((p) => p.type === NFTA_VERDICT_CHAIN)?.value;
  const target = chain === undefined ? '' : chain.subarray(0, chain.indexOf(0) < 0 ? chain.length : chain.indexOf(0)).toString('utf8');
  switch (code.readInt32BE(0)) {
    case 1:
      return { accept: null };
    case 0:
      return { drop: null };
    case -5:
      return { return: null };
    case -3:
      return { jump: { target } };
    case -4:
      return { goto: { target } };
    default:
      throw malformed(map, `verdict code ${code.readInt32BE(0)}`);
  }
}

function valueOf(nested: { readonly value: Buffer } | undefined): Buffer | undefined {
  return nested === undefined ? undefined : attributes(nested.value).find((a) => a.type === NFTA_DATA_VALUE)?.value;
}

/** Every attribute in order (several may share a type: a list's elements do). */
function attributes(bytes: Buffer): { type: number; value: Buffer }[] {
  const found: { type: number; value: Buffer }[] = [];
  let offset = 0;
  while (offset + 4 <= bytes.length) {
    const length = bytes.readUInt16LE(offset);
    if (length < 4 || offset + length > bytes.length)
      throw new NetlinkError(`netlink: an attribute at offset ${offset} says it is ${length} bytes long, but ${bytes.length - offset} are left`);
    // Flags ride in the high bits of the type (NLA_F_NESTED, NLA_F_NET_BYTEORDER).
    found.push({ type: bytes.readUInt16LE(offset + 2) & 0x3fff, value: bytes.subarray(offset + 4, offset + length) });
    offset += (length + 3) & ~3;
  }
  return found;
}

function attribute(type: number, value: Buffer): Buffer {
  const header = Buffer.alloc(4);
  header.writeUInt16LE(4 + value.length, 0);
  header.writeUInt16LE(type, 2);
  return Buffer.concat([header, value, Buffer.alloc(((value.length + 3) & ~3) - value.length)]);
}

function cString(text: string): Buffer {
  return Buffer.concat([Buffer.from(text, 'utf8'), Buffer.from([0])]);
}

function malformed(map: string, what: string): EgressError {
  return new EgressError(ErrorCode.NftState, `the kernel listed map ${map} with ${what}`);
}
