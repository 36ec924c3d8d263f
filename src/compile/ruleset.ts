/**
 * The one typed model of the part of nftables egressd uses: the compiler
 * produces it, the swap renames and splits it into transactions of typed
 * commands, and the binding (src/nft) renders and sends those — tables,
 * chains, sets, elements and verdicts are defined here and nowhere else.
 * Rendered two ways: libnftables JSON (for tools, comparisons and element
 * changes) and nft text (what tables are applied as, because nft 1.0.6's
 * JSON parser has no `socket cgroupv2` expression — measured: "Invalid socket
 * key value"). Both renderings come from the same objects, so they cannot
 * drift apart.
 */

export interface TableRef {
  readonly family: 'inet';
  readonly name: string;
}

export type SetKey = 'ipv4_addr' | 'ipv6_addr' | 'uid' | 'gid' | 'mark' | 'inet_proto' | 'inet_service' | { readonly cgroupLevel: number };
/** `dynamic`: the packet path adds elements (`update @set`); nft infers it only for rules in the set's own transaction. */
export type SetFlag = 'interval' | 'timeout' | 'dynamic';

/** The table egressd owns; the binding refuses any transaction that names another. */
export const EGRESSD_TABLE: TableRef = { family: 'inet', name: 'egressd' };

/** A chain, set or map of a table. */
export interface ObjectRef {
  readonly table: TableRef;
  readonly name: string;
}

export type Verdict =
  | { readonly accept: null }
  | { readonly drop: null }
  | { readonly return: null }
  | { readonly jump: { readonly target: string } }
  | { readonly goto: { readonly target: string } };

export type Element = string | number | { readonly prefix: { readonly addr: string; readonly len: number } } | { readonly range: readonly [number, number] };

export interface SetDecl {
  readonly name: string;
  readonly key: SetKey;
  /** Present for verdict maps. */
  readonly map?: 'verdict';
  readonly flags: readonly SetFlag[];
  readonly elements: readonly Element[];
  /** For maps: one verdict per element, same order. */
  readonly verdicts?: readonly Verdict[];
  readonly comment?: string;
  /** For sets the packet path fills (`update @set`): at most this many elements, each gone `timeout` seconds after its last packet. */
  readonly size?: number;
  readonly timeout?: number;
  /**
   * For sets filled at run time: a digest of what fills them (the DNS names
   * bound to them). Not rendered; a set is kept across applies only while
   * its declaration, elements and source stay the same.
   */
  readonly source?: string;
}

export type Expr =
  | { readonly meta: { readonly key: 'oif' | 'l4proto' | 'skuid' | 'skgid' | 'nfproto' | 'mark' } }
  | { readonly payload: { readonly protocol: 'ip' | 'ip6' | 'th' | 'tcp'; readonly field: 'daddr' | 'dport' | 'saddr' | 'sport' } }
  | { readonly payload: { readonly protocol: 'icmpv6'; readonly field: 'type' } }
  | { readonly payload: { readonly protocol: 'ip6'; readonly field: 'hoplimit' | 'nexthdr' } }
  | { readonly payload: { readonly protocol: 'tcp'; readonly field: 'flags' } }
  | { readonly socket: { readonly key: 'cgroupv2'; readonly level: number } }
  | { readonly socket: { readonly key: 'mark' | 'transparent' } }
  /** An IPv6 extension header's field: nft finds the header wherever it is in the chain of headers; a packet without one breaks the rule. */
  | { readonly exthdr: { readonly name: 'rt'; readonly field: 'type' } }
  | { readonly ct: { readonly key: 'state' | 'direction' | 'mark' } }
  | { readonly set: readonly Element[] }
  /** A list of flags, tested bitwise (`ct state established,related`): no set at all. */
  | readonly string[]
  /** A bitwise AND, as libnftables JSON writes it: `ip6 daddr & ffff:ffff::`, `tcp flags & (syn | ack)` (a list of flags). */
  | { readonly '&': readonly [Expr, string | readonly string[]] }
  /** A bitwise OR: `ct mark & 0x0000ffff | 0x00010000`. */
  | { readonly '|': readonly [Expr, string] }
  | Element;

export type Statement =
  | { readonly match: { readonly op: '==' | '!=' | 'in'; readonly left: Expr; readonly right: Expr } }
  | { readonly vmap: { readonly key: Expr; readonly data: string } }
  /** `ct mark set VALUE`: the only value egressd writes. */
  | { readonly mangle: { readonly key: { readonly ct: { readonly key: 'mark' } }; readonly value: Expr } }
  | { readonly counter: null }
  | { readonly limit: { readonly rate: number; readonly per: 'second' | 'minute' | 'hour'; readonly burst: number } }
  /** Bytes, as libnftables JSON writes it; `inv`: matches only over the rate. */
  | {
      readonly limit: {
        readonly rate: number;
        readonly rate_unit: 'bytes';
        readonly per: 'second';
        readonly burst: number;
        readonly burst_unit: 'bytes';
        readonly inv: true;
      };
    }
  | { readonly log: { readonly prefix: string; readonly group: number } }
  /** `update @set { KEY STATEMENTS }`: the packet's key, added (or refreshed) in a dynamic set, with statements of its own per element (a per-key limit). */
  | { readonly set: { readonly op: 'update'; readonly elem: Expr; readonly set: string; readonly stmt: readonly Statement[] } }
  | Verdict;

export interface RuleDecl {
  readonly expr: readonly Statement[];
  readonly comment?: string;
}

export interface ChainDecl {
  readonly name: string;
  readonly hook?: { readonly hook: 'output'; readonly prio: number; readonly policy: 'accept' | 'drop' };
  readonly rules: readonly RuleDecl[];
}

export interface Ruleset {
  readonly table: TableRef;
  readonly sets: readonly SetDecl[];
  readonly chains: readonly ChainDecl[];
}

// ---- constructors ---------------------------------------------------------

export const verdict = {
  accept: (): Verdict => ({ accept: null }),
  drop: (): Verdict => ({ drop: null }),
  return: (): Verdict => ({ return: null }),
  jump: (target: string): Verdict => ({ jump: { target } }),
  goto: (target: string): Verdict => ({ goto: { target } }),
};

const eq = (left: Expr, right: Expr): Statement => ({ match: { op: '==', left, right } });

/** The netmask of a prefix length: 255.255.255.0, ffff:ffff:ffff:ffff::. */
export function prefixMask(family: 4 | 6, prefix: number): string {
  const bits = family === 4 ? 32 : 128;
  const groups = Array.from({ length: bits / (family === 4 ? 8 : 16) }, (_, i) => {
    const width = family === 4 ? 8 : 16;
    const ones = Math.max(0, Math.min(width, prefix - i * width));
    return ones === 0 ? 0 : ((1 << width) - 1) ^ ((1 << (width - ones)) - 1);
  });
  if (family === 4) return groups.join('.');
  return groups
    .map((g) => g.toString(16))
    .join(':')
    .replace(/(^|:)0(:0)+$/, '::')
    .replace(/^::?$/, '::');
}

export const match = {
  oif: (name: string): Statement => eq({ meta: { key: 'oif' } }, name),
  daddr: (family: 4 | 6, setName: string): Statement => eq({ payload: { protocol: family === 4 ? 'ip' : 'ip6', field: 'daddr' } }, `@${setName}`),
  /** The destination's first `prefix` bits looked up in a set of network addresses. */
  daddrMasked: (family: 4 | 6, prefix: number, setName: string): Statement =>
    eq({ '&': [{ payload: { protocol: family === 4 ? 'ip' : 'ip6', field: 'daddr' } }, prefixMask(family, prefix)] }, `@${setName}`),
  daddrIs: (family: 4 | 6, address: string): Statement => eq({ payload: { protocol: family === 4 ? 'ip' : 'ip6', field: 'daddr' } }, address),
  /** One protocol, or `@set` of several. */
  l4proto: (protocols: string): Statement => eq({ meta: { key: 'l4proto' } }, protocols),
  /** Destination port of any transport header — one, a range, or `@set` of several; callers pair it with an l4proto match. */
  dport: (ports: Element): Statement => eq({ payload: { protocol: 'th', field: 'dport' } }, ports),
  tcpDport: (port: number): Statement => eq({ payload: { protocol: 'tcp', field: 'dport' } }, port),
  saddrIs: (family: 4 | 6, address: string): Statement => eq({ payload: { protocol: family === 4 ? 'ip' : 'ip6', field: 'saddr' } }, address),
  tcpSport: (port: number): Statement => eq({ payload: { protocol: 'tcp', field: 'sport' } }, port),
  /** A TCP packet without SYN: neither a connection's first packet nor its answer (`tcp flags & syn 0`). Any other protocol breaks the rule. */
  tcpWithoutSyn: (): Statement => eq({ '&': [{ payload: { protocol: 'tcp', field: 'flags' } }, 'syn'] }, 0),
  /** A SYN-ACK: both flags set, whatever else (ECN) is. Any other protocol breaks the rule. */
  tcpSynAck: (): Statement => eq({ '&': [{ payload: { protocol: 'tcp', field: 'flags' } }, ['syn', 'ack']] }, ['syn', 'ack']),
  /** The socket's owner is none of `uids`; a packet without an owner (the kernel's own) breaks the rule. */
  skuidNotIn: (uids: readonly number[]): Statement => ({ match: { op: '!=', left: { meta: { key: 'skuid' } }, right: { set: uids } } }),
  skuid: (uid: number): Statement => eq({ meta: { key: 'skuid' } }, uid),
  /** The packet's mark (a socket's SO_MARK) equals `value` (hex, `0x` and 8 digits). */
  mark: (value: string): Statement => eq({ meta: { key: 'mark' } }, value),
  /** The packet's socket has an owner: every uid matches, and a socket without a file (the kernel's own) has none to load. */
  owned: (): Statement => eq({ meta: { key: 'skuid' } }, { range: [0, 4294967295] }),
  /**
   * The packet leaves from a full socket: `socket mark` loads for one only.
   * A SYN-ACK leaves from a request socket (not full: `socket cgroupv2`
   * cannot see its cgroup, while `meta skuid` reads its listener's), a
   * TIME_WAIT socket's ACK from a timewait one, a syncookie SYN-ACK from none.
   */
  fullSocket: (): Statement => eq({ socket: { key: 'mark' } }, { range: [0, 4294967295] }),
  /**
   * The packet leaves from a socket of any kind — full, request or timewait,
   * a process's or the kernel's own (a service in the kernel, the control
   * socket resets come from) — which `socket transparent` loads for in the
   * output hook: all but a SYN cookie's SYN-ACK, which leaves from none
   * (measured: `meta skuid` loads for neither the kernel's sockets nor a
   * cookie's; this loads for the first only).
   */
  fromSocket: (): Statement => eq({ socket: { key: 'transparent' } }, { range: [0, 1] }),
  hoplimit: (limit: number): Statement => eq({ payload: { protocol: 'ip6', field: 'hoplimit' } }, limit),
  daddrIn6Multicast: (): Statement => eq({ payload: { protocol: 'ip6', field: 'daddr' } }, { prefix: { addr: 'ff00::', len: 8 } }),
  icmpv6Type: (types: readonly string[]): Statement => eq({ payload: { protocol: 'icmpv6', field: 'type' } }, { set: types }),
  ctState: (states: readonly string[]): Statement => ({ match: { op: 'in', left: { ct: { key: 'state' } }, right: states } }),
  ctDirection: (direction: 'original' | 'reply'): Statement => eq({ ct: { key: 'direction' } }, direction),
  /** The bits `mask` of the connection's mark equal `value` (both hex, `0x` and 8 digits). */
  ctMark: (mask: string, value: string): Statement => eq({ '&': [{ ct: { key: 'mark' } }, mask] }, value),
  /** The header right after the IPv6 header: a payload load, where finding an extension header anywhere in the chain walks it. */
  ip6Nexthdr: (header: number): Statement => eq({ payload: { protocol: 'ip6', field: 'nexthdr' } }, header),
  /** An IPv6 routing header of any type but `type`; a packet without a routing header does not match. */
  routingHeaderOtherThan: (type: number): Statement => ({ match: { op: '!=', left: { exthdr: { name: 'rt', field: 'type' } }, right: type } }),
};

export const dispatch = {
  cgroup: (level: number, mapName: string): Statement => ({ vmap: { key: { socket: { key: 'cgroupv2', level } }, data: `@${mapName}` } }),
  uid: (mapName: string): Statement => ({ vmap: { key: { meta: { key: 'skuid' } }, data: `@${mapName}` } }),
  gid: (mapName: string): Statement => ({ vmap: { key: { meta: { key: 'skgid' } }, data: `@${mapName}` } }),
  /** By the bits `mask` of the connection's mark: whose connection it is (ct-mark.ts). */
  ctMark: (mask: string, mapName: string): Statement => ({ vmap: { key: { '&': [{ ct: { key: 'mark' } }, mask] }, data: `@${mapName}` } }),
};

export const stmt = {
  counter: (): Statement => ({ counter: null }),
  limit: (rate: number, per: 'second' | 'minute' | 'hour', burst: number): Statement => ({ limit: { rate, per, burst } }),
  /** Matches the bytes over `rate` per second, after a burst of `burst` bytes. */
  limitBytesOver: (rate: number, burst: number): Statement => ({ limit: { rate, rate_unit: 'bytes', per: 'second', burst, burst_unit: 'bytes', inv: true } }),
  log: (prefix: string, group: number): Statement => ({ log: { prefix, group } }),
  /** `update @setName { key inner… }`: breaks the rule when the set is full or an inner statement breaks (a limit over its rate). */
  update: (setName: string, key: Expr, inner: readonly Statement[]): Statement => ({ set: { op: 'update', elem: key, set: `@${setName}`, stmt: inner } }),
  /** Writes `value` into the bits of the connection's mark outside `keep`, keeping the bits `keep` names. */
  ctMarkSet: (keep: string, value: string): Statement => ({
    mangle: { key: { ct: { key: 'mark' } }, value: { '|': [{ '&': [{ ct: { key: 'mark' } }, keep] }, value] } },
  }),
};

export function rule(expr: readonly Statement[], comment?: string): RuleDecl {
  return comment === undefined ? { expr } : { expr, comment };
}

/**
 * Text nft can carry in a quoted string, at most `maxBytes` long: its strings
 * have no escapes, so quotes, backslashes and control characters are replaced,
 * and the cut is made in bytes (nft's limits are bytes) on a character boundary.
 */
export function safeText(text: string, maxBytes: number): string {
  // eslint-disable-next-line no-control-regex -- control characters are what nft strings cannot carry
  const clean = text.replace(/["\\\u0000-\u001f\u007f]/g, "'");
  if (Buffer.byteLength(clean) <= maxBytes) return clean;
  let cut = '';
  for (const char of clean) {
    if (Buffer.byteLength(cut + char) > maxBytes - 3) break;
    cut += char;
  }
  return `${cut}...`;
}

/** Rule, set and chain comments are at most 128 bytes. */
export function safeComment(text: string): string {
  return safeText(text, 128);
}

/** Quotes a string for nft text; callers pass only text nft can carry (see safeText). */
function quote(text: string): string {
  // eslint-disable-next-line no-control-regex -- control characters are what nft strings cannot carry
  if (/["\u0000-\u001f]/.test(text)) throw new Error(`internal: ${JSON.stringify(text)} cannot be written as an nft string`);
  return `"${text}"`;
}

// ---- commands: what a transaction is made of ------------------------------

/** One element to add or delete, with its per-element options. */
export interface ElementEntry {
  readonly key: Element;
  /** A verdict map's data; absent for set elements. */
  readonly data?: Verdict;
  /** Whole seconds (nft JSON's unit); the set needs `flags timeout`. */
  readonly timeout?: number;
  readonly comment?: string;
}

/**
 * One command of a transaction. `add block` is `table F N { sets, chains }`:
 * it adds what is not there and appends rules to chains that are; `create
 * chain` fails if the chain exists, which is how a racing writer is noticed.
 */
export type Command =
  | { readonly op: 'add table' | 'delete table'; readonly table: TableRef }
  | { readonly op: 'add block'; readonly ruleset: Ruleset }
  | { readonly op: 'create chain' | 'flush chain' | 'delete chain' | 'delete set' | 'delete map'; readonly ref: ObjectRef }
  | { readonly op: 'add element' | 'delete element'; readonly ref: ObjectRef; readonly elements: readonly ElementEntry[] };

export const command = {
  addTable: (table: TableRef): Command => ({ op: 'add table', table }),
  deleteTable: (table: TableRef): Command => ({ op: 'delete table', table }),
  block: (ruleset: Ruleset): Command => ({ op: 'add block', ruleset }),
  createChain: (table: TableRef, name: string): Command => ({ op: 'create chain', ref: { table, name } }),
  flushChain: (table: TableRef, name: string): Command => ({ op: 'flush chain', ref: { table, name } }),
  deleteChain: (table: TableRef, name: string): Command => ({ op: 'delete chain', ref: { table, name } }),
  deleteSet: (table: TableRef, name: string): Command => ({ op: 'delete set', ref: { table, name } }),
  deleteMap: (table: TableRef, name: string): Command => ({ op: 'delete map', ref: { table, name } }),
  addElements: (ref: ObjectRef, elements: readonly ElementEntry[]): Command => ({ op: 'add element', ref, elements }),
  deleteElements: (ref: ObjectRef, elements: readonly ElementEntry[]): Command => ({ op: 'delete element', ref, elements }),
};

/** The table a command acts on. */
export function tableOf(c: Command): TableRef {
  if ('table' in c) return c.table;
  if ('ruleset' in c) return c.ruleset.table;
  return c.ref.table;
}

/** Every object name a command writes into nft's input (the table's aside). */
export function namesOf(c: Command): string[] {
  if ('table' in c) return [];
  if ('ruleset' in c) return [...c.ruleset.sets.map((x) => x.name), ...c.ruleset.chains.map((x) => x.name)];
  return [c.ref.name];
}

/** A one-line summary for error messages: "add element inet egressd dns4 (3 elements)". */
export function describeCommand(c: Command): string {
  const { family, name } = tableOf(c);
  if ('table' in c) return `${c.op} ${family} ${name}`;
  if ('ruleset' in c) return `table ${family} ${name} { ${c.ruleset.sets.length} sets and maps, ${c.ruleset.chains.length} chains }`;
  const count = 'elements' in c ? ` (${c.elements.length} element${c.elements.length === 1 ? '' : 's'})` : '';
  return `${c.op} ${family} ${name} ${c.ref.name}${count}`;
}

// ---- JSON rendering (libnftables JSON schema 1) --------------------------

export type JsonObject = { readonly [key: string]: unknown };

function keyJson(key: SetKey): JsonObject {
  if (typeof key === 'string') return { type: key };
  // The JSON parser cannot express `typeof socket cgroupv2 level N`; the closest is the data type.
  return { type: 'cgroupsv2' };
}

function elementJson(element: Element): unknown {
  return element;
}

function entryJson(entry: ElementEntry, op: 'add element' | 'delete element'): unknown {
  // nft finds elements by key: a delete sends the key alone.
  if (op === 'delete element') return elementJson(entry.key);
  const options = { ...(entry.timeout === undefined ? {} : { timeout: entry.timeout }), ...(entry.comment === undefined ? {} : { comment: entry.comment }) };
  const key = Object.keys(options).length === 0 ? elementJson(entry.key) : { elem: { val: elementJson(entry.key), ...options } };
  return entry.data === undefined ? key : [key, entry.data];
}

/** The libnftables JSON command for a table or element change; the other commands go as text (see renderCommandsText). */
export function commandJson(c: Command): JsonObject {
  if ('table' in c) return { [c.op === 'add table' ? 'add' : 'delete']: { table: { family: c.table.family, name: c.table.name } } };
  if ('elements' in c) {
    const { table, name } = c.ref;
    return {
      [c.op === 'add element' ? 'add' : 'delete']: {
        element: { family: table.family, table: table.name, name, elem: c.elements.map((e) => entryJson(e, c.op)) },
      },
    };
  }
  throw new Error(`internal: ${c.op} is sent as text`);
}

/** True when every command has a JSON form (cheap: no text parser, no file). */
export function isJsonCommand(c: Command): boolean {
  return c.op === 'add table' || c.op === 'delete table' || c.op === 'add element' || c.op === 'delete element';
}

export function renderJson(ruleset: Ruleset): { nftables: JsonObject[] } {
  const { family, name: table } = ruleset.table;
  const out: JsonObject[] = [{ metainfo: { json_schema_version: 1 } }, { table: { family, name: table } }];
  // Chains before sets: verdict-map elements jump to chains, and JSON objects are applied in order.
  for (const chain of ruleset.chains) {
    out.push({
      chain: chain.hook
        ? { family, table, name: chain.name, type: 'filter', hook: chain.hook.hook, prio: chain.hook.prio, policy: chain.hook.policy }
        : { family, table, name: chain.name },
    });
  }
  for (const set of ruleset.sets) {
    const body: Record<string, unknown> = { family, table, name: set.name, ...keyJson(set.key) };
    if (set.map) body['map'] = set.map;
    // nft 1.0.6's JSON parser refuses `dynamic` (it lists such a set without it too); tables are applied as text, which carries it.
    const flags = set.flags.filter((flag) => flag !== 'dynamic');
    if (flags.length > 0) body['flags'] = flags;
    if (set.elements.length > 0) {
      body['elem'] = set.map ? set.elements.map((element, i) => [elementJson(element), set.verdicts![i]]) : set.elements.map(elementJson);
    }
    if (set.comment) body['comment'] = set.comment;
    if (set.size !== undefined) body['size'] = set.size;
    if (set.timeout !== undefined) body['timeout'] = set.timeout;
    out.push({ [set.map ? 'map' : 'set']: body });
  }
  for (const chain of ruleset.chains) {
    for (const r of chain.rules) {
      out.push({ rule: { family, table, chain: chain.name, expr: r.expr, ...(r.comment ? { comment: r.comment } : {}) } });
    }
  }
  return { nftables: out };
}

// ---- text rendering (nft -f) ----------------------------------------------

/** `symbolic`: names nft knows for the set's type (tcp, udp), written bare. */
function elementText(element: Element, symbolic = false): string {
  if (typeof element === 'string') return symbolic || /^[0-9a-fA-F:.]+$/.test(element) ? element : quote(element);
  if (typeof element === 'number') return String(element);
  if ('prefix' in element) return `${element.prefix.addr}/${element.prefix.len}`;
  return `${element.range[0]}-${element.range[1]}`;
}

function exprText(expr: Expr): string {
  if (isFlagList(expr)) return expr.join(',');
  if (typeof expr === 'string') {
    if (expr.startsWith('@')) return expr;
    // Addresses, protocol names and conntrack states are bare words in nft's grammar.
    return /^[a-z0-9][a-z0-9:.-]*$/i.test(expr) ? expr : quote(expr);
  }
  if (typeof expr === 'number') return String(expr);
  if ('meta' in expr) return `meta ${expr.meta.key}`;
  if ('payload' in expr) return `${expr.payload.protocol} ${expr.payload.field}`;
  if ('socket' in expr) return expr.socket.key === 'cgroupv2' ? `socket cgroupv2 level ${expr.socket.level}` : `socket ${expr.socket.key}`;
  if ('exthdr' in expr) return `${expr.exthdr.name} ${expr.exthdr.field}`;
  if ('ct' in expr) return `ct ${expr.ct.key}`;
  if ('set' in expr) return `{ ${expr.set.map((e) => exprText(e as Expr)).join(', ')} }`;
  if ('&' in expr) {
    const [left, operand] = expr['&'];
    return `${exprText(left)} & ${isFlagList(operand) ? `(${operand.join(' | ')})` : operand}`;
  }
  if ('|' in expr) return `${exprText(expr['|'][0])} | ${expr['|'][1]}`;
  return elementText(expr);
}

function isFlagList(expr: Expr): expr is readonly string[] {
  return Array.isArray(expr);
}

function verdictText(v: Verdict): string {
  if ('accept' in v) return 'accept';
  if ('drop' in v) return 'drop';
  if ('return' in v) return 'return';
  if ('jump' in v) return `jump ${v.jump.target}`;
  return `goto ${v.goto.target}`;
}

function statementText(s: Statement): string {
  if ('match' in s) {
    const op = s.match.op === '!=' ? '!= ' : '';
    const left = s.match.left;
    // Interface names are strings in nft's grammar and must be quoted.
    const quoted = typeof left === 'object' && 'meta' in left && left.meta.key === 'oif' && typeof s.match.right === 'string';
    return `${exprText(left)} ${op}${quoted ? quote(s.match.right) : exprText(s.match.right)}`;
  }
  if ('vmap' in s) return `${exprText(s.vmap.key)} vmap ${s.vmap.data}`;
  if ('mangle' in s) return `${exprText(s.mangle.key)} set ${exprText(s.mangle.value)}`;
  if ('counter' in s) return 'counter';
  if ('limit' in s) {
    if ('inv' in s.limit) return `limit rate over ${s.limit.rate} bytes/${s.limit.per} burst ${s.limit.burst} bytes`;
    return `limit rate ${s.limit.rate}/${s.limit.per} burst ${s.limit.burst} packets`;
  }
  if ('log' in s) return `log prefix ${quote(s.log.prefix)} group ${s.log.group}`;
  if ('set' in s) return `update ${s.set.set} { ${exprText(s.set.elem)} ${s.set.stmt.map(statementText).join(' ')} }`;
  return verdictText(s);
}

function setKeyText(key: SetKey): string {
  if (typeof key === 'string') return `type ${key}`;
  return `typeof socket cgroupv2 level ${key.cgroupLevel}`;
}

/**
 * The `elements = { … }` text of plain sets, by their element array: an
 * apply renders the same 100,000 CIDRs twice (its generation's names, and
 * last-good.nft), and withGeneration keeps the array.
 */
const elementBlocks = new WeakMap<readonly Element[], string>();

function elementBlock(set: SetDecl): string {
  const cached = set.map ? undefined : elementBlocks.get(set.elements);
  if (cached !== undefined) return cached;
  const symbolic = set.key === 'inet_proto';
  const items = set.elements.map((element, i) => (set.map ? `${elementText(element)} : ${verdictText(set.verdicts![i]!)}` : elementText(element, symbolic)));
  const rows: string[] = [];
  for (let i = 0; i < items.length; i += 8) rows.push(items.slice(i, i + 8).join(', '));
  const block = `\t\telements = { ${rows.join(',\n\t\t\t     ')} }`;
  if (!set.map) elementBlocks.set(set.elements, block);
  return block;
}

/** Renders `table inet NAME { … }`. Elements are written eight to a line to keep huge sets readable and fast to parse. */
export function renderText(ruleset: Ruleset): string {
  const lines: string[] = [`table ${ruleset.table.family} ${ruleset.table.name} {`];
  for (const set of ruleset.sets) {
    lines.push(`\t${set.map ? 'map' : 'set'} ${set.name} {`);
    lines.push(`\t\t${setKeyText(set.key)}${set.map ? ` : ${set.map}` : ''}`);
    if (set.size !== undefined) lines.push(`\t\tsize ${set.size}`);
    if (set.flags.length > 0) lines.push(`\t\tflags ${set.flags.join(',')}`);
    if (set.timeout !== undefined) lines.push(`\t\ttimeout ${set.timeout}s`);
    if (set.comment) lines.push(`\t\tcomment ${quote(set.comment)}`);
    if (set.elements.length > 0) lines.push(elementBlock(set));
    lines.push('\t}');
  }
  for (const chain of ruleset.chains) {
    lines.push(`\tchain ${chain.name} {`);
    if (chain.hook) lines.push(`\t\ttype filter hook ${chain.hook.hook} priority ${chain.hook.prio}; policy ${chain.hook.policy};`);
    for (const r of chain.rules) {
      const comment = r.comment ? ` comment ${quote(r.comment)}` : '';
      lines.push(`\t\t${r.expr.map(statementText).join(' ')}${comment}`);
    }
    lines.push('\t}');
  }
  lines.push('}');
  return `${lines.join('\n')}\n`;
}

function entryText(entry: ElementEntry, op: 'add element' | 'delete element'): string {
  if (op === 'delete element') return elementText(entry.key);
  const timeout = entry.timeout === undefined ? '' : ` timeout ${entry.timeout}s`;
  const comment = entry.comment === undefined ? '' : ` comment ${quote(entry.comment)}`;
  return `${elementText(entry.key)}${timeout}${comment}${entry.data === undefined ? '' : ` : ${verdictText(entry.data)}`}`;
}

function commandText(c: Command): string {
  if ('ruleset' in c) return renderText(c.ruleset);
  const { family, name } = tableOf(c);
  if ('table' in c) return `${c.op} ${family} ${name}\n`;
  if ('elements' in c) return `${c.op} ${family} ${name} ${c.ref.name} { ${c.elements.map((e) => entryText(e, c.op)).join(', ')} }\n`;
  return `${c.op} ${family} ${name} ${c.ref.name}\n`;
}

/** The nft text of one transaction: every command, in order. */
export function renderCommandsText(commands: readonly Command[]): string {
  return commands.map(commandText).join('');
}
