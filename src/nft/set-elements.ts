/**
 * Addresses learned at run time (DNS answers) into the table's sets, on the
 * resolver's hot path: an answer waits for its addresses to be in the kernel
 * before it leaves.
 *
 * Not through nft: an element add there fetches and overlap-checks every
 * interval set in the namespace (≈ 0.85 s with a 100,000-element one
 * present, however fresh the context). Here each add is netfilter's own
 * message, NFT_MSG_NEWSETELEM, built by libnftnl (the library nft itself
 * builds its messages with) and sent in one nfnetlink batch on a netlink
 * socket of our own: nothing is fetched, so an add costs the same whatever
 * else the namespace holds. The kernel runs a batch as one transaction, in
 * the sender's own sendmsg, and acknowledges every message before that
 * returns; so `add` is synchronous and takes microseconds, unless another
 * transaction (an apply) holds nf_tables' lock, which it then waits out.
 *
 * An element already in a set gets its timeout refreshed: every element
 * carries an expiration as well as its timeout, and without NLM_F_EXCL the
 * kernel updates both on an element it finds there instead of refusing it.
 * The expiration is what makes it: measured on 6.18, a re-add with the same
 * timeout and no expiration leaves the expiry where it was (the kernel sees
 * nothing to update). A refresh never shortens what this writer set before
 * (see `deadlines`). A comment is
 * nft's element comment (libnftnl's userdata TLV), so `nft list` shows it;
 * a refresh keeps the comment the element was first added with.
 *
 * Only the one table the writer was opened for is named, and every set name
 * passes the same identifier check as the rest of src/nft (./guard.ts).
 */
import { createRequire } from 'node:module';
import { isIPv4, isIPv6 } from 'node:net';
import { endianness, release } from 'node:os';
import { performance } from 'node:perf_hooks';
import { EGRESSD_TABLE, safeComment } from '../compile/ruleset.js';
import { EgressError, ErrorCode, SetWriteRefusedError, type SetWriteRefusal } from '../errors.js';
import {
  errnoName,
  errorCodeOf,
  NetlinkError,
  NetlinkFamily,
  NLMSG_HDRLEN,
  NlmFlag,
  NlmsgType,
  openNetlinkTransport,
  parseAttributes,
  parseMessages,
  type NetlinkMessage,
  type NetlinkTransport,
} from '../system/netlink.js';
import { checkName } from './guard.js';

export interface ElementWrite {
  readonly set: string;
  readonly address: string;
  readonly timeoutMs: number;
  readonly comment?: string;
}

export interface SetElementWriter {
  /** One netlink transaction for all of them, acknowledged by the kernel before it returns. Refreshes the timeout of elements already there. */
  add(writes: readonly ElementWrite[]): void;
  /**
   * Takes addresses out of sets, in one transaction; an address a set does
   * not hold is no error (NFT_MSG_DESTROYSETELEM, Linux 6.3 and later).
   */
  remove(removals: readonly ElementRemoval[]): void;
  close(): void;
}

export interface ElementRemoval {
  readonly set: string;
  readonly address: string;
}

export interface SetElementWriterOptions {
  /** Default libnftnl.so.11 (Debian's libnftnl11). */
  readonly libraryPath?: string;
  /** How long to wait for the kernel's acknowledgements; default 5000 ms. */
  readonly receiveTimeoutMs?: number;
  /** As WriterInternals.destroy: for tests of what kernels before 6.3 get. */
  readonly destroy?: boolean;
}

export const DEFAULT_LIBNFTNL = 'libnftnl.so.11';

/** What one transaction may hold: the batch must fit the socket's send buffer in one datagram. */
export const MAX_WRITES_PER_TRANSACTION = 8192;

/** Opens a netlink socket in this process's network namespace and binds libnftnl; throws EGD_NFT_UNAVAILABLE or EGD_NETLINK when either cannot be had. */
export function openSetElementWriter(table: { family: 'inet'; name: string } = EGRESSD_TABLE, options: SetElementWriterOptions = {}): SetElementWriter {
  const { api, transport } = openNetfilter(table, options);
  return createSetElementWriter(api, transport, table.name, options.destroy === undefined ? {} : { destroy: options.destroy });
}

/** libnftnl and a netlink socket of this process's network namespace, for writes into `table`. */
function openNetfilter(table: { family: 'inet'; name: string }, options: SetElementWriterOptions): { api: LibnftnlApi; transport: NetlinkTransport } {
  // The types say inet; the check holds whatever a caller cast.
  // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition
  if (table.family !== 'inet') throw refusedBeforeSending(`only inet tables are written, not ${String(table.family)}`);
  checkWriteName('table', table.name);
  const api = loadLibnftnl(options.libraryPath ?? DEFAULT_LIBNFTNL);
  const transport = openNetlinkTransport(NetlinkFamily.Netfilter, {
    extendedAck: true,
    sendBufferBytes: SEND_BUFFER_BYTES,
    ...(options.receiveTimeoutMs === undefined ? {} : { receiveTimeoutMs: options.receiveTimeoutMs }),
  });
  return { api, transport };
}

export interface WriterInternals {
  /** Where sequence numbers start; answers are matched on them. */
  readonly firstSeq?: number;
  /** A monotonic clock in milliseconds; default performance.now. */
  readonly now?: () => number;
  /** Remove with NFT_MSG_DESTROYSETELEM (default: on Linux 6.3 and later), else one NFT_MSG_DELSETELEM a batch. */
  readonly destroy?: boolean;
}

/** The writer over a given library binding and transport (tests pass fakes of either). */
export function createSetElementWriter(api: LibnftnlApi, transport: NetlinkTransport, tableName: string, internals: WriterInternals = {}): SetElementWriter {
  checkWriteName('table', tableName);
  const now = internals.now ?? (() => performance.now());
  let seq = (internals.firstSeq ?? Math.floor(Date.now() / 1000)) >>> 0;
  let closed = false;
  const nextSeq = (): number => (seq = (seq + 1) >>> 0);
  // When each element this writer wrote expires, so that a shorter timeout never cuts one short:
  // one address answers several names (a CDN), and the name with the longer TTL must keep it.
  // The kernel takes no expiration past the timeout (ERANGE), so both are set to the longer time.
  const deadlines = new Map<string, number>();
  let pruneAt = 1024;

  return {
    add(writes) {
      if (closed) throw new EgressError(ErrorCode.NftUnavailable, 'set element writer: closed');
      if (writes.length === 0) return;
      if (writes.length > MAX_WRITES_PER_TRANSACTION)
        throw refusedBeforeSending(`${writes.length} element writes in one transaction, more than the ${MAX_WRITES_PER_TRANSACTION} one batch may hold`);
      const sets = groupBySet(writes);
      const start = now();
      for (const elements of sets.values()) {
        for (const e of elements) {
          const left = (deadlines.get(e.id) ?? 0) - start;
          if (left > e.timeoutMs) e.timeoutMs = Math.ceil(left);
        }
      }
      const batch = buildBatch(api, tableName, sets, nextSeq, 'add');
      transport.send(batch.datagram);
      awaitAcks(transport, batch, tableName);
      for (const elements of sets.values()) for (const e of elements) deadlines.set(e.id, start + e.timeoutMs);
      if (deadlines.size >= pruneAt) {
        for (const [id, deadline] of deadlines) if (deadline <= start) deadlines.delete(id);
        pruneAt = Math.max(1024, deadlines.size * 2);
      }
    },
    remove(removals) {
      if (closed) throw new EgressError(ErrorCode.NftUnavailable, 'set element writer: closed');
      if (removals.length === 0) return;
      if (removals.length > MAX_WRITES_PER_TRANSACTION)
        throw refusedBeforeSending(`${removals.length} element removals in one transaction, more than the ${MAX_WRITES_PER_TRANSACTION} one batch may hold`);
      const sets = groupBySet(removals.map((r) => ({ ...r, timeoutMs: 1 })));
      if (internals.destroy ?? DESTROY_SUPPORTED) {
        const batch = buildBatch(api, tableName, sets, nextSeq, 'destroy');
        transport.send(batch.datagram);
        awaitAcks(transport, batch, tableName);
      } else {
        // Before Linux 6.3 a deletion of an element that is not there fails its whole batch: one element a batch, and "not there" is done.
        for (const [set, elements] of sets) {
          for (const element of elements) {
            const batch = buildBatch(api, tableName, new Map([[set, [element]]]), nextSeq, 'delete');
            transport.send(batch.datagram);
            try {
              awaitAcks(transport, batch, tableName);
            } catch (error) {
              if (!(error instanceof SetWriteRefusedError && error.errno === ERRNO.ENOENT)) throw error;
            }
          }
        }
      }
      for (const elements of sets.values()) for (const e of elements) deadlines.delete(e.id);
    },
    close() {
      if (closed) return;
      closed = true;
      transport.close();
    },
  };
}

// --- what one transaction says -------------------------------------------------------------

interface Element {
  /** The set and the key: what the kernel tells elements apart by. */
  readonly id: string;
  readonly key: Buffer;
  readonly address: string;
  /** 0: an element without a timeout (a cgroup map's: it goes when its cgroup goes). */
  timeoutMs: number;
  comment: string | undefined;
  /** A verdict map's element: what it maps to. */
  readonly verdict?: ElementVerdict;
}

/** A verdict as netfilter codes it (NF_ACCEPT, NFT_GOTO, …), with its chain for a jump or goto. */
interface ElementVerdict {
  readonly code: number;
  readonly chain?: string;
}

/** The writes per set, each address once: a repeated one keeps the longest timeout and the last comment. */
function groupBySet(writes: readonly ElementWrite[]): Map<string, Element[]> {
  const sets = new Map<string, Map<string, Element>>();
  for (const w of writes) {
    checkWriteName('set', w.set);
    if (!Number.isSafeInteger(w.timeoutMs) || w.timeoutMs < 1)
      throw refusedBeforeSending(`element timeout must be a whole number of milliseconds >= 1, got ${String(w.timeoutMs)}`, w.set);
    const key = addressKey(w.address, w.set);
    let elements = sets.get(w.set);
    if (elements === undefined) sets.set(w.set, (elements = new Map<string, Element>()));
    const id = `${w.set} ${key.toString('hex')}`;
    const comment = w.comment === undefined || w.comment === '' ? undefined : safeComment(w.comment);
    const seen = elements.get(id);
    if (seen === undefined) elements.set(id, { id, key, address: w.address, timeoutMs: w.timeoutMs, comment });
    else {
      seen.timeoutMs = Math.max(seen.timeoutMs, w.timeoutMs);
      if (comment !== undefined) seen.comment = comment;
    }
  }
  return new Map([...sets].map(([set, elements]) => [set, [...elements.values()]]));
}

/** An address in network byte order, as the set's key holds it; the family is the address's own. */
export function addressKey(address: string, set?: string): Buffer {
  if (isIPv4(address)) return Buffer.from(address.split('.').map(Number));
  // A zone (fe80::1%eth0) names an interface, not something a set holds.
  if (!isIPv6(address) || address.includes('%')) throw refusedBeforeSending(`${JSON.stringify(address)} is not an IPv4 or IPv6 address`, set);
  const out = Buffer.alloc(16);
  let text = address;
  // An embedded IPv4 tail (::ffff:192.0.2.1) is the last two groups.
  const v4 = /(\d+\.\d+\.\d+\.\d+)$/.exec(text);
  if (v4 !== null) {
    const b = v4[1]!.split('.').map(Number);
    text = `${text.slice(0, v4.index)}${((b[0]! << 8) | b[1]!).toString(16)}:${((b[2]! << 8) | b[3]!).toString(16)}`;
  }
  const [head, tail] = text.split('::') as [string, string | undefined];
  const groups = (part: string): number[] => (part === '' ? [] : part.split(':').map((g) => parseInt(g, 16)));
  const before = groups(head);
  const after = tail === undefined ? [] : groups(tail);
  const all = [...before, ...new Array<number>(8 - before.length - after.length).fill(0), ...after];
  all.forEach((g, i) => out.writeUInt16BE(g, i * 2));
  return out;
}

// --- libnftnl ------------------------------------------------------------------------------

/** Opaque libnftnl objects as koffi hands them back. */
type Ptr = { readonly __brand: 'pointer' };

/** The libnftnl functions the writer uses, typed; each is the C function of the same name. */
export interface LibnftnlApi {
  setAlloc(): Ptr | null;
  setFree(set: Ptr): void;
  setSetStr(set: Ptr, attr: number, value: string): number;
  setSetU32(set: Ptr, attr: number, value: number): void;
  elemAlloc(): Ptr | null;
  elemSet(elem: Ptr, attr: number, data: Buffer | Ptr, length: number): number;
  elemSetU64(elem: Ptr, attr: number, value: number): void;
  /** For verdict-map elements (cgroup maps): a fake binding without them cannot write those. */
  elemSetU32?(elem: Ptr, attr: number, value: number): void;
  elemSetStr?(elem: Ptr, attr: number, value: string): number;
  elemAdd(set: Ptr, elem: Ptr): void;
  nlmsgBuildHdr(buffer: Buffer, type: number, family: number, flags: number, seq: number): Ptr;
  setElemsNlmsgBuildPayload(nlh: Ptr, set: Ptr): void;
  batchBegin(buffer: Buffer, seq: number): Ptr;
  batchEnd(buffer: Buffer, seq: number): Ptr;
  udataBufAlloc(size: number): Ptr | null;
  udataBufFree(buf: Ptr): void;
  udataPutStrz(buf: Ptr, type: number, value: string): boolean;
  udataBufData(buf: Ptr): Ptr;
  udataBufLen(buf: Ptr): number;
}

/** Binds libnftnl through koffi; throws EGD_NFT_UNAVAILABLE when koffi, the library or a symbol is missing. */
export function loadLibnftnl(path: string = DEFAULT_LIBNFTNL): LibnftnlApi {
  try {
    const koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const lib = koffi.load(path);
    const ptr = koffi.pointer(koffi.opaque());
    const fn = (name: string, result: string | typeof ptr, args: (string | typeof ptr)[]) => lib.func(name, result, args) as (...a: unknown[]) => unknown;
    const setAlloc = fn('nftnl_set_alloc', ptr, []);
    const setFree = fn('nftnl_set_free', 'void', [ptr]);
    const setSetStr = fn('nftnl_set_set_str', 'int', [ptr, 'uint16_t', 'const char *']);
    const setSetU32 = fn('nftnl_set_set_u32', 'void', [ptr, 'uint16_t', 'uint32_t']);
    const elemAlloc = fn('nftnl_set_elem_alloc', ptr, []);
    const elemSet = fn('nftnl_set_elem_set', 'int', [ptr, 'uint16_t', 'const void *', 'uint32_t']);
    const elemSetU64 = fn('nftnl_set_elem_set_u64', 'void', [ptr, 'uint16_t', 'uint64_t']);
    const elemAdd = fn('nftnl_set_elem_add', 'void', [ptr, ptr]);
    const elemSetU32 = fn('nftnl_set_elem_set_u32', 'void', [ptr, 'uint16_t', 'uint32_t']);
    const elemSetStr = fn('nftnl_set_elem_set_str', 'int', [ptr, 'uint16_t', 'const char *']);
    // The message buffers are Node Buffers: koffi passes their memory itself, so libnftnl writes straight into them.
    const nlmsgBuildHdr = fn('nftnl_nlmsg_build_hdr', 'void *', ['void *', 'uint16_t', 'uint16_t', 'uint16_t', 'uint32_t']);
    const buildPayload = fn('nftnl_set_elems_nlmsg_build_payload', 'void', ['void *', ptr]);
    const batchBegin = fn('nftnl_batch_begin', 'void *', ['void *', 'uint32_t']);
    const batchEnd = fn('nftnl_batch_end', 'void *', ['void *', 'uint32_t']);
    const udataBufAlloc = fn('nftnl_udata_buf_alloc', ptr, ['uint32_t']);
    const udataBufFree = fn('nftnl_udata_buf_free', 'void', [ptr]);
    const udataPutStrz = fn('nftnl_udata_put_strz', 'bool', [ptr, 'uint8_t', 'const char *']);
    const udataBufData = fn('nftnl_udata_buf_data', 'void *', [ptr]);
    const udataBufLen = fn('nftnl_udata_buf_len', 'uint32_t', [ptr]);
    return {
      setAlloc: () => setAlloc() as Ptr | null,
      setFree: (s) => void setFree(s),
      setSetStr: (s, a, v) => setSetStr(s, a, v) as number,
      setSetU32: (s, a, v) => void setSetU32(s, a, v),
      elemAlloc: () => elemAlloc() as Ptr | null,
      elemSet: (e, a, d, l) => elemSet(e, a, d, l) as number,
      elemSetU64: (e, a, v) => void elemSetU64(e, a, v),
      elemAdd: (s, e) => void elemAdd(s, e),
      elemSetU32: (e, a, v) => void elemSetU32(e, a, v),
      elemSetStr: (e, a, v) => elemSetStr(e, a, v) as number,
      nlmsgBuildHdr: (b, t, f, fl, sq) => nlmsgBuildHdr(b, t, f, fl, sq) as Ptr,
      setElemsNlmsgBuildPayload: (n, s) => void buildPayload(n, s),
      batchBegin: (b, sq) => batchBegin(b, sq) as Ptr,
      batchEnd: (b, sq) => batchEnd(b, sq) as Ptr,
      udataBufAlloc: (n) => udataBufAlloc(n) as Ptr | null,
      udataBufFree: (b) => void udataBufFree(b),
      udataPutStrz: (b, t, v) => udataPutStrz(b, t, v) as boolean,
      udataBufData: (b) => udataBufData(b) as Ptr,
      udataBufLen: (b) => udataBufLen(b) as number,
    };
  } catch (cause) {
    throw new EgressError(ErrorCode.NftUnavailable, `cannot load ${path}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
}

// <linux/netfilter/nf_tables.h>, <libnftnl/set.h>, <libnftnl/udata.h>
const NFT_MSG_NEWSETELEM = 12;
const NFT_MSG_DELSETELEM = 14;
/** Deletes an element, and is no error where there is none (Linux 6.3). */
const NFT_MSG_DESTROYSETELEM = 30;
/** Linux 6.3 or later: NFT_MSG_DESTROYSETELEM. Debian 12's own kernel is 6.1. */
const DESTROY_SUPPORTED = (() => {
  const [major = 0, minor = 0] = release()
    .split('.')
    .map((part) => parseInt(part, 10));
  return major > 6 || (major === 6 && minor >= 3);
})();
/** What one batch does to its elements: add (or refresh), delete, or delete where there. */
type ElementChange = 'add' | 'delete' | 'destroy';
const NFPROTO_INET = 1;
const NLM_F_CREATE = 0x400;
const NFTNL_SET_TABLE = 0;
const NFTNL_SET_NAME = 1;
const NFTNL_SET_FAMILY = 7;
const NFTNL_SET_ELEM_KEY = 1;
const NFTNL_SET_ELEM_VERDICT = 2;
const NFTNL_SET_ELEM_CHAIN = 3;
const NFTNL_SET_ELEM_TIMEOUT = 5;
const NFTNL_SET_ELEM_EXPIRATION = 6;
const NFTNL_SET_ELEM_USERDATA = 7;
const NFTNL_UDATA_SET_ELEM_COMMENT = 0;
/** NFT_USERDATA_MAXLEN: what the kernel takes. */
const USERDATA_MAX = 256;
const NFTA_SET_ELEM_LIST_TABLE = 1;
const NFTA_SET_ELEM_LIST_SET = 2;
// <linux/netlink.h>: extended acknowledgements.
const NLM_F_CAPPED = 0x100;
const NLM_F_ACK_TLVS = 0x200;
const NLMSGERR_ATTR_MSG = 1;
const NLMSGERR_ATTR_OFFS = 2;

/** NFT_NAME_MAXLEN, with its NUL. */
const NAME_MAX_BYTES = 255;
/**
 * Elements per message. Its element list is one attribute, whose length is
 * 16 bits: 128 elements of at most ELEMENT_BOUND bytes stay well inside it.
 */
const ELEMENTS_PER_MESSAGE = 128;
/** At most what one element takes in a message: nest 4, key 4+4+16, timeout 12, expiration 12, userdata 4+132. */
const ELEMENT_BOUND = 256;
const SEND_BUFFER_BYTES = 4 * 1024 * 1024;

interface Batch {
  readonly datagram: Buffer;
  readonly beginSeq: number;
  readonly endSeq: number;
  /** Each element message by its sequence number: which set it wrote, and its bytes (to read a refused attribute back). */
  readonly messages: Map<number, { readonly set: string; readonly bytes: Buffer; readonly count: number }>;
}

function buildBatch(api: LibnftnlApi, table: string, sets: Map<string, Element[]>, nextSeq: () => number, kind: ElementChange): Batch {
  const parts: Buffer[] = [];
  const begin = Buffer.alloc(NLMSG_HDRLEN + 4);
  const beginSeq = nextSeq();
  api.batchBegin(begin, beginSeq);
  parts.push(begin);
  const messages: Batch['messages'] = new Map();
  for (const [set, elements] of sets) {
    for (let i = 0; i < elements.length; i += ELEMENTS_PER_MESSAGE) {
      const seq = nextSeq();
      const bytes = buildMessage(api, table, set, elements.slice(i, i + ELEMENTS_PER_MESSAGE), seq, kind);
      messages.set(seq, { set, bytes, count: Math.min(ELEMENTS_PER_MESSAGE, elements.length - i) });
      parts.push(bytes);
    }
  }
  const end = Buffer.alloc(NLMSG_HDRLEN + 4);
  const endSeq = nextSeq();
  api.batchEnd(end, endSeq);
  parts.push(end);
  return { datagram: Buffer.concat(parts), beginSeq, endSeq, messages };
}

const align4 = (n: number): number => (n + 3) & ~3;

function buildMessage(api: LibnftnlApi, table: string, set: string, elements: readonly Element[], seq: number, kind: ElementChange): Buffer {
  // libnftnl writes without bounds checks: the buffer is sized for the most these elements can take.
  const bound = NLMSG_HDRLEN + 4 + 2 * (4 + align4(NAME_MAX_BYTES + 1)) + 4 + elements.length * ELEMENT_BOUND;
  const buffer = Buffer.alloc(bound);
  const nftSet = api.setAlloc();
  if (nftSet === null) throw new EgressError(ErrorCode.NftUnavailable, 'libnftnl: nftnl_set_alloc failed');
  try {
    if (api.setSetStr(nftSet, NFTNL_SET_TABLE, table) !== 0 || api.setSetStr(nftSet, NFTNL_SET_NAME, set) !== 0)
      throw new EgressError(ErrorCode.NftUnavailable, 'libnftnl: nftnl_set_set_str failed');
    api.setSetU32(nftSet, NFTNL_SET_FAMILY, NFPROTO_INET);
    for (const element of elements) addElement(api, nftSet, element, kind);
    const nlh =
      kind === 'add'
        ? api.nlmsgBuildHdr(buffer, NFT_MSG_NEWSETELEM, NFPROTO_INET, NLM_F_CREATE | NlmFlag.Ack, seq)
        : api.nlmsgBuildHdr(buffer, kind === 'destroy' ? NFT_MSG_DESTROYSETELEM : NFT_MSG_DELSETELEM, NFPROTO_INET, NlmFlag.Ack, seq);
    api.setElemsNlmsgBuildPayload(nlh, nftSet);
  } finally {
    // Frees the elements added to it too.
    api.setFree(nftSet);
  }
  const length = buffer.readUInt32LE(0);
  if (length <= NLMSG_HDRLEN || length > bound)
    throw new EgressError(ErrorCode.NftUnavailable, `libnftnl built a ${length}-byte message where at most ${bound} fit`);
  return buffer.subarray(0, align4(length));
}

/** Adds one element to `nftSet`, which owns it from then on (and frees it with itself, whatever fails after). */
function addElement(api: LibnftnlApi, nftSet: Ptr, element: Element, kind: ElementChange): void {
  const elem = api.elemAlloc();
  if (elem === null) throw new EgressError(ErrorCode.NftUnavailable, 'libnftnl: nftnl_set_elem_alloc failed');
  api.elemAdd(nftSet, elem);
  let ok = api.elemSet(elem, NFTNL_SET_ELEM_KEY, element.key, element.key.length) === 0;
  // A removal names its key and nothing else.
  if (kind !== 'add') {
    if (!ok) throw new EgressError(ErrorCode.NftUnavailable, `libnftnl could not build the element ${element.address}`);
    return;
  }
  if (element.verdict !== undefined) {
    if (api.elemSetU32 === undefined || api.elemSetStr === undefined)
      throw new EgressError(ErrorCode.NftUnavailable, 'libnftnl binding without verdict elements');
    api.elemSetU32(elem, NFTNL_SET_ELEM_VERDICT, element.verdict.code >>> 0);
    if (element.verdict.chain !== undefined) ok = ok && api.elemSetStr(elem, NFTNL_SET_ELEM_CHAIN, element.verdict.chain) === 0;
  }
  if (element.timeoutMs > 0) {
    api.elemSetU64(elem, NFTNL_SET_ELEM_TIMEOUT, element.timeoutMs);
    // The expiration is what makes the kernel refresh an element that is there already: see the header.
    api.elemSetU64(elem, NFTNL_SET_ELEM_EXPIRATION, element.timeoutMs);
  }
  if (element.comment !== undefined) {
    const udata = api.udataBufAlloc(USERDATA_MAX);
    if (udata === null) ok = false;
    else {
      try {
        ok = ok && api.udataPutStrz(udata, NFTNL_UDATA_SET_ELEM_COMMENT, element.comment);
        ok = ok && api.elemSet(elem, NFTNL_SET_ELEM_USERDATA, api.udataBufData(udata), api.udataBufLen(udata)) === 0;
      } finally {
        api.udataBufFree(udata);
      }
    }
  }
  if (!ok) throw new EgressError(ErrorCode.NftUnavailable, `libnftnl could not build the element ${element.address}`);
}

// --- what the kernel answers ---------------------------------------------------------------

interface Refusal {
  readonly seq: number;
  readonly errno: number;
  /** The kernel's own words (extended ack), when it gave any. */
  readonly text: string | undefined;
  /** The attribute type of the original message that it refused, when it said which. */
  readonly attribute: number | undefined;
}

/** Reads until every element message is answered; throws on the first refusal of the batch itself, or on every refusal of its messages, classified. */
function awaitAcks(transport: NetlinkTransport, batch: Batch, table: string): void {
  const pending = new Set(batch.messages.keys());
  const refusals: Refusal[] = [];
  while (pending.size > 0) {
    for (const message of parseMessages(transport.receive())) {
      // Answers to an earlier batch that failed half-way carry older sequence numbers.
      const ours = pending.has(message.seq) || message.seq === batch.beginSeq || message.seq === batch.endSeq;
      if (!ours || message.type === NlmsgType.Noop) continue;
      if (message.type !== NlmsgType.Error) throw new NetlinkError(`netlink: unexpected message type ${message.type} in answer to an element batch`);
      const refusal = readRefusal(message, batch);
      if (message.seq === batch.beginSeq || message.seq === batch.endSeq) {
        // Refused whole (no permission, say): the kernel reads no further, so no other answer comes.
        if (refusal.errno !== 0) throw classify(refusal, undefined, table, []);
        continue;
      }
      pending.delete(message.seq);
      if (refusal.errno !== 0) refusals.push(refusal);
    }
  }
  const first = refusals[0];
  if (first === undefined) return;
  const details = refusals.map((r) => describe(r, batch.messages.get(r.seq)?.set));
  throw classify(first, batch.messages.get(first.seq)?.set, table, details);
}

function readRefusal(message: NetlinkMessage, batch: Batch): Refusal {
  const errno = -errorCodeOf(message);
  let text: string | undefined;
  let attribute: number | undefined;
  if ((message.flags & NLM_F_ACK_TLVS) !== 0 && message.payload.length >= 4 + NLMSG_HDRLEN) {
    // struct nlmsgerr: error, the refused message's header (and, uncapped, its payload), then the TLVs.
    const echoed = message.payload.readUInt32LE(4);
    const start = 4 + ((message.flags & NLM_F_CAPPED) !== 0 ? NLMSG_HDRLEN : align4(echoed));
    if (start <= message.payload.length) {
      const tlvs = parseAttributes(message.payload.subarray(start));
      const msg = tlvs.get(NLMSGERR_ATTR_MSG);
      if (msg !== undefined) text = msg.toString('utf8').replace(/\0.*$/s, '');
      const offs = tlvs.get(NLMSGERR_ATTR_OFFS);
      const sent = batch.messages.get(message.seq)?.bytes;
      if (offs !== undefined && offs.length >= 4 && sent !== undefined) attribute = topLevelAttributeAt(sent, offs.readUInt32LE(0));
    }
  }
  return { seq: message.seq, errno, text, attribute };
}

/**
 * The type of the message's own attribute that starts at `offset`, if one
 * does: the kernel may point inside the element list too, where types mean
 * something else (measured: ERANGE for an expiration past the timeout
 * points at an element).
 */
function topLevelAttributeAt(message: Buffer, offset: number): number | undefined {
  let at = NLMSG_HDRLEN + 4;
  while (at + 4 <= message.length) {
    const length = message.readUInt16LE(at);
    if (at === offset) return message.readUInt16LE(at + 2) & 0x3fff;
    if (length < 4 || at > offset) return undefined;
    at += align4(length);
  }
  return undefined;
}

const ERRNO = { EPERM: 1, ENOENT: 2, EACCES: 13, EINVAL: 22, ENFILE: 23, ENOSPC: 28, ERANGE: 34, EOPNOTSUPP: 95 } as const;

function classify(refusal: Refusal, set: string | undefined, table: string, details: readonly string[]): SetWriteRefusedError {
  let reason: SetWriteRefusal;
  switch (refusal.errno) {
    case ERRNO.ENOENT:
      // The kernel points at the name it did not find; without that pointer, the set is the likelier.
      reason = refusal.attribute === NFTA_SET_ELEM_LIST_TABLE ? 'missing-table' : 'missing-set';
      break;
    case ERRNO.EPERM:
    case ERRNO.EACCES:
      reason = 'permission';
      break;
    case ERRNO.EINVAL:
    case ERRNO.ERANGE:
    case ERRNO.EOPNOTSUPP:
      reason = 'invalid';
      break;
    case ERRNO.ENFILE:
    case ERRNO.ENOSPC:
      reason = 'full';
      break;
    default:
      reason = 'other';
  }
  const where = reason === 'missing-table' || set === undefined ? `table inet ${table}` : `set inet ${table} ${set}`;
  return new SetWriteRefusedError(reason, `the kernel refused the element write to ${where}: ${describe(refusal, undefined)} (nothing was written)`, {
    ...(reason === 'missing-table' || set === undefined ? {} : { set }),
    errno: refusal.errno,
    details,
  });
}

function describe(refusal: Refusal, set: string | undefined): string {
  const attr = refusal.attribute === NFTA_SET_ELEM_LIST_TABLE ? ' (the table)' : refusal.attribute === NFTA_SET_ELEM_LIST_SET ? ' (the set)' : '';
  return `${set === undefined ? '' : `${set}: `}${errnoName(refusal.errno)}${attr}${refusal.text === undefined ? '' : `: ${refusal.text}`}`;
}

function refusedBeforeSending(message: string, set?: string): SetWriteRefusedError {
  return new SetWriteRefusedError('invalid', `${message} (nothing was sent)`, set === undefined ? {} : { set });
}

/** The guard's identifier check, refused as a write refusal; nft's names are at most 255 bytes. */
function checkWriteName(kind: string, name: string): void {
  try {
    checkName(kind, name);
  } catch (error) {
    throw refusedBeforeSending((error as Error).message.replace(/ \(nothing was sent to nft\)$/, ''), kind === 'set' ? name : undefined);
  }
  if (Buffer.byteLength(name) > NAME_MAX_BYTES) throw refusedBeforeSending(`${kind} name ${JSON.stringify(name)} is longer than ${NAME_MAX_BYTES} bytes`);
}

// --- cgroup maps: `typeof socket cgroupv2 level N` verdict maps ----------------------------

/** What a cgroup map element maps to: nft's verdicts, a chain's by its live name. */
export type MapVerdict =
  | { readonly kind: 'accept' }
  | { readonly kind: 'drop' }
  | { readonly kind: 'return' }
  | { readonly kind: 'jump'; readonly chain: string }
  | { readonly kind: 'goto'; readonly chain: string };

export interface CgroupElementWrite {
  /** The map's live name. */
  readonly map: string;
  /** The cgroup's id: the inode number of its directory, as `socket cgroupv2` yields it. */
  readonly id: bigint;
  readonly verdict: MapVerdict;
}

export interface CgroupElementRemoval {
  readonly map: string;
  readonly id: bigint;
}

/**
 * Cgroup ids into the table's identity maps, by netfilter's own messages
 * like the address writer: nft would resolve a path (and fetch its cache),
 * while the kernel keys these maps by the id, which the tracker has from a
 * stat of the directory. So a cgroup whose name nft cannot carry (any
 * bytes) is written all the same. Elements carry no timeout: an id is
 * never reused, and the tracker removes it when its cgroup goes.
 */
export interface CgroupMapWriter {
  /** One transaction, acknowledged before it returns. An element already there with the same verdict is no error. */
  add(writes: readonly CgroupElementWrite[]): void;
  /** One transaction; an id a map does not hold is no error. */
  remove(removals: readonly CgroupElementRemoval[]): void;
  close(): void;
}

/** Opens a netlink socket in this process's network namespace for cgroup map writes; throws EGD_NFT_UNAVAILABLE or EGD_NETLINK when either cannot be had. */
export function openCgroupMapWriter(table: { family: 'inet'; name: string } = EGRESSD_TABLE, options: SetElementWriterOptions = {}): CgroupMapWriter {
  const { api, transport } = openNetfilter(table, options);
  return createCgroupMapWriter(api, transport, table.name, options.destroy === undefined ? {} : { destroy: options.destroy });
}

/** The cgroup map writer over a given library binding and transport. */
export function createCgroupMapWriter(api: LibnftnlApi, transport: NetlinkTransport, tableName: string, internals: WriterInternals = {}): CgroupMapWriter {
  checkWriteName('table', tableName);
  let seq = (internals.firstSeq ?? Math.floor(Date.now() / 1000) + 0x4000_0000) >>> 0;
  let closed = false;
  const nextSeq = (): number => (seq = (seq + 1) >>> 0);
  const check = (count: number, what: string): void => {
    if (closed) throw new EgressError(ErrorCode.NftUnavailable, 'cgroup map writer: closed');
    if (count > MAX_WRITES_PER_TRANSACTION)
      throw refusedBeforeSending(`${count} cgroup element ${what} in one transaction, more than the ${MAX_WRITES_PER_TRANSACTION} one batch may hold`);
  };
  return {
    add(writes) {
      check(writes.length, 'writes');
      if (writes.length === 0) return;
      const batch = buildBatch(api, tableName, groupCgroupElements(writes), nextSeq, 'add');
      transport.send(batch.datagram);
      awaitAcks(transport, batch, tableName);
    },
    remove(removals) {
      check(removals.length, 'removals');
      if (removals.length === 0) return;
      const sets = groupCgroupElements(removals);
      if (internals.destroy ?? DESTROY_SUPPORTED) {
        const batch = buildBatch(api, tableName, sets, nextSeq, 'destroy');
        transport.send(batch.datagram);
        awaitAcks(transport, batch, tableName);
        return;
      }
      // Before Linux 6.3: one element a batch, and "not there" is done (as the address writer does).
      for (const [set, elements] of sets) {
        for (const element of elements) {
          const batch = buildBatch(api, tableName, new Map([[set, [element]]]), nextSeq, 'delete');
          transport.send(batch.datagram);
          try {
            awaitAcks(transport, batch, tableName);
          } catch (error) {
            if (!(error instanceof SetWriteRefusedError && error.errno === ERRNO.ENOENT)) throw error;
          }
        }
      }
    },
    close() {
      if (closed) return;
      closed = true;
      transport.close();
    },
  };
}

/** `socket cgroupv2` loads the id into a register as the CPU holds it: the key is the id in host byte order. */
export function cgroupKey(id: bigint): Buffer {
  if (id < 0n || id >= 1n << 64n) throw refusedBeforeSending(`cgroup id ${String(id)} is not a 64-bit unsigned number`);
  const key = Buffer.alloc(8);
  if (endianness() === 'LE') key.writeBigUInt64LE(id);
  else key.writeBigUInt64BE(id);
  return key;
}

const MAX_VERDICT_CHAIN_BYTES = 200;
const VERDICT_CODE = { accept: 1, drop: 0, return: -5, jump: -3, goto: -4 } as const;

function groupCgroupElements(writes: readonly (CgroupElementRemoval & { readonly verdict?: MapVerdict })[]): Map<string, Element[]> {
  const sets = new Map<string, Map<string, Element>>();
  for (const w of writes) {
    checkWriteName('set', w.map);
    const verdict = w.verdict;
    if (verdict !== undefined && (verdict.kind === 'jump' || verdict.kind === 'goto')) {
      checkWriteName('chain', verdict.chain);
      // What keeps an element within ELEMENT_BOUND: nest, key, and a verdict nest with its chain's name.
      if (Buffer.byteLength(verdict.chain) > MAX_VERDICT_CHAIN_BYTES)
        throw refusedBeforeSending(`chain name ${JSON.stringify(verdict.chain)} is longer than ${MAX_VERDICT_CHAIN_BYTES} bytes`, w.map);
    }
    const key = cgroupKey(w.id);
    let elements = sets.get(w.map);
    if (elements === undefined) sets.set(w.map, (elements = new Map<string, Element>()));
    const id = `${w.map} ${key.toString('hex')}`;
    elements.set(id, {
      id,
      key,
      address: `cgroup ${String(w.id)}`,
      timeoutMs: 0,
      comment: undefined,
      ...(verdict === undefined ? {} : { verdict: { code: VERDICT_CODE[verdict.kind], ...('chain' in verdict ? { chain: verdict.chain } : {}) } }),
    });
  }
  return new Map([...sets].map(([set, elements]) => [set, [...elements.values()]]));
}

// --- one transaction for the writes of one event-loop turn ---------------------------------

export interface BatchingWriter {
  /** Resolves once the kernel acknowledged the transaction these writes went in with whatever else was asked for in the same turn. */
  add(writes: readonly ElementWrite[]): Promise<void>;
  /** Writes what is pending first (an add asked for before a removal lands before it), then removes. */
  remove(removals: readonly ElementRemoval[]): Promise<void>;
  /** Writes what is pending, then closes the writer. */
  close(): void;
}

export interface BatchingOptions {
  /** When the pending writes go: default setImmediate, after every I/O callback of this turn of the event loop. */
  readonly schedule?: (flush: () => void) => void;
}

interface Request {
  readonly writes: readonly ElementWrite[];
  readonly resolve: () => void;
  readonly reject: (error: unknown) => void;
}

/**
 * Concurrent answers (each awaiting its own `add`) share one transaction:
 * what is asked for within one turn of the event loop goes to the kernel
 * together, after that turn's I/O callbacks ran. A refused shared
 * transaction wrote nothing; each request is then tried alone, so that one
 * answer's stale set name fails that answer only.
 */
export function createBatchingWriter(writer: SetElementWriter, options: BatchingOptions = {}): BatchingWriter {
  const schedule = options.schedule ?? ((flush) => void setImmediate(flush));
  let pending: Request[] = [];
  let scheduled = false;
  let closed = false;

  function flush(): void {
    scheduled = false;
    const requests = pending;
    pending = [];
    for (const group of transactions(requests)) {
      try {
        writer.add(group.flatMap((r) => r.writes));
        for (const r of group) r.resolve();
      } catch (error) {
        if (group.length === 1) {
          group[0]!.reject(error);
          continue;
        }
        for (const r of group) {
          try {
            writer.add(r.writes);
            r.resolve();
          } catch (alone) {
            r.reject(alone);
          }
        }
      }
    }
  }

  return {
    add(writes) {
      if (closed) return Promise.reject(new EgressError(ErrorCode.NftUnavailable, 'set element writer: closed'));
      if (writes.length === 0) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        pending.push({ writes, resolve, reject });
        if (!scheduled) {
          scheduled = true;
          schedule(flush);
        }
      });
    },
    remove(removals) {
      if (closed) return Promise.reject(new EgressError(ErrorCode.NftUnavailable, 'set element writer: closed'));
      if (pending.length > 0) flush();
      try {
        writer.remove(removals);
        return Promise.resolve();
      } catch (error) {
        return Promise.reject(error instanceof Error ? error : new Error(String(error)));
      }
    },
    close() {
      if (closed) return;
      closed = true;
      if (pending.length > 0) flush();
      writer.close();
    },
  };
}

/** Requests in order, grouped so that no transaction holds more than one batch may; a request is never split. */
function transactions(requests: readonly Request[]): Request[][] {
  const groups: Request[][] = [];
  let current: Request[] = [];
  let size = 0;
  for (const r of requests) {
    if (current.length > 0 && size + r.writes.length > MAX_WRITES_PER_TRANSACTION) {
      groups.push(current);
      current = [];
      size = 0;
    }
    current.push(r);
    size += r.writes.length;
  }
  if (current.length > 0) groups.push(current);
  return groups;
}
