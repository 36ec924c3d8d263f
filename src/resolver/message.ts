/**
 * DNS messages as the resolver reads and writes them, through dns-packet:
 * what a client's query must be to be answered, and the replies built from
 * it. Nothing here does I/O.
 */
import dnsPacket, { type Answer, type DecodedPacket, type Question as WireQuestion } from 'dns-packet';
import type { AnswerRecord } from './server.js';

export const Rcode = { NoError: 0, FormErr: 1, ServFail: 2, NxDomain: 3, NotImp: 4, Refused: 5, BadVers: 16 } as const;

const Flag = { QR: 0x8000, AA: 0x0400, TC: 0x0200, RD: 0x0100, RA: 0x0080, AD: 0x0020, CD: 0x0010 } as const;

/** The UDP payload size the resolver advertises and asks upstreams for (DNS flag day 2020: no fragments). */
export const EDNS_UDP_SIZE = 1232;
/** A client without EDNS gets at most this much over UDP (RFC 1035). */
export const CLASSIC_UDP_SIZE = 512;
/** The most sent over UDP whatever the client offers (BIND's max-udp-size default): more goes over TCP. */
const MAX_UDP_REPLY = 4096;
const HEADER_BYTES = 12;
/** A query has one question and at most an OPT (and perhaps a TSIG or a cookie's companions): more is not a query. */
const MAX_QUERY_ADDITIONALS = 4;

/** A client's query that the resolver will answer. */
export interface Query {
  readonly id: number;
  readonly flags: number;
  /** The question as the client wrote it (its case is echoed back). */
  readonly question: WireQuestion;
  /** Lower-case, no trailing dot; the root is ".". */
  readonly name: string;
  readonly type: string;
  /** The client's EDNS0, if it sent an OPT record. */
  readonly edns: { readonly udpPayloadSize: number; readonly version: number } | undefined;
}

/** What to do with bytes that are not a query to answer: drop them, or answer with an error and as much of the query as could be read. */
export type Rejection = { readonly drop: string } | { readonly rcode: number; readonly reason: string; readonly reply: Buffer };

/** The header's id and flags, when there are 12 bytes. */
function header(raw: Buffer): { id: number; flags: number; qd: number; an: number; ns: number; ar: number } | undefined {
  if (raw.length < HEADER_BYTES) return undefined;
  return {
    id: raw.readUInt16BE(0),
    flags: raw.readUInt16BE(2),
    qd: raw.readUInt16BE(4),
    an: raw.readUInt16BE(6),
    ns: raw.readUInt16BE(8),
    ar: raw.readUInt16BE(10),
  };
}

/** An error reply carrying only the header (and the question, when there is one to echo). */
function errorReply(id: number, flags: number, rcode: number, question?: WireQuestion): Buffer {
  return dnsPacket.encode({
    type: 'response',
    id,
    flags: replyFlags(flags, rcode),
    questions: question === undefined ? [] : [question],
  });
}

function replyFlags(queryFlags: number, rcode: number): number {
  // Opcode QUERY (0); RD and CD echoed; recursion available.
  return (queryFlags & (Flag.RD | Flag.CD)) | Flag.RA | (rcode & 0xf);
}

export function normalizeName(name: string): string {
  if (name === '.' || name === '') return '.';
  return name.toLowerCase().replace(/\.$/, '');
}

/**
 * Reads a client's message. Answered only if it is a standard query
 * (opcode QUERY) with exactly one question of class IN and nothing but
 * additional records; a message too short for a header, or one that is a
 * response itself (never answer a response: no loops between resolvers),
 * is dropped.
 */
export function parseQuery(raw: Buffer): Query | Rejection {
  const head = header(raw);
  if (head === undefined) return { drop: `${raw.length} bytes, too short for a header` };
  if ((head.flags & Flag.QR) !== 0) return { drop: 'a response, not a query' };
  const reject = (rcode: number, reason: string, question?: WireQuestion): Rejection => ({
    rcode,
    reason,
    reply: errorReply(head.id, head.flags, rcode, question),
  });
  const opcode = (head.flags >> 11) & 0xf;
  if (opcode !== 0) return reject(Rcode.NotImp, `opcode ${opcode}`);
  // Checked on the header before decoding anything: 10,000 questions cost nothing.
  if (head.qd !== 1) return reject(Rcode.FormErr, `${head.qd} questions`);
  if (head.an !== 0 || head.ns !== 0 || head.ar > MAX_QUERY_ADDITIONALS)
    return reject(Rcode.FormErr, `${head.an}/${head.ns}/${head.ar} answer/authority/additional records in a query`);
  let packet: DecodedPacket;
  try {
    packet = dnsPacket.decode(raw);
  } catch (error) {
    return reject(Rcode.FormErr, `undecodable: ${(error as Error).message}`);
  }
  const question = packet.questions?.[0];
  if (question === undefined) return reject(Rcode.FormErr, 'no question');
  // A name whose bytes do not survive decoding and encoding (a dot inside a label, bytes that are not UTF-8, a compression pointer) would be asked upstream as another name.
  let echoed: Buffer;
  try {
    echoed = dnsPacket.encode({ type: 'query', id: 0, flags: 0, questions: [question] });
  } catch (error) {
    return reject(Rcode.FormErr, `a question that cannot be encoded again: ${(error as Error).message}`);
  }
  if (!raw.subarray(HEADER_BYTES, echoed.length).equals(echoed.subarray(HEADER_BYTES)))
    return reject(Rcode.FormErr, 'a question that does not encode back to itself');
  if (question.class !== 'IN') return reject(Rcode.NotImp, `class ${question.class ?? '?'}`, question);
  const type = question.type as string;
  if (type === 'OPT') return reject(Rcode.FormErr, 'question type OPT', question);
  // A zone transfer is not a question a forwarder answers.
  if (type === 'AXFR' || type === 'IXFR') return reject(Rcode.NotImp, `question type ${type}`, question);
  const opts = (packet.additionals ?? []).filter((record) => record.type === 'OPT');
  if (opts.length > 1) return reject(Rcode.FormErr, `${opts.length} OPT records`, question);
  const opt = opts[0];
  const edns =
    opt?.type === 'OPT' ? { udpPayloadSize: Math.min(MAX_UDP_REPLY, Math.max(CLASSIC_UDP_SIZE, opt.udpPayloadSize)), version: opt.ednsVersion } : undefined;
  return { id: head.id, flags: head.flags, question, name: normalizeName(question.name), type, edns };
}

export function isRejection(parsed: Query | Rejection): parsed is Rejection {
  return !('question' in parsed);
}

/** What a reply says besides the header and question. */
export interface ReplyContent {
  readonly rcode: number;
  readonly answers?: readonly Answer[];
  readonly authorities?: readonly Answer[];
}

/**
 * The reply to `query`: its id, question (as written) and RD echoed, with
 * an OPT record when the client sent one. `limit` is the most a UDP client
 * takes: a reply that does not fit goes out with TC=1 and no records, which
 * tells the client to ask again over TCP.
 */
export function encodeReply(query: Query, content: ReplyContent, limit?: number): { bytes: Buffer; truncated: boolean } {
  const asked = query.name;
  // Owner names the upstream wrote in lower case get the client's spelling back (0x20-style clients compare them).
  const spelled = (record: Answer): Answer =>
    record.type !== 'OPT' && normalizeName(record.name) === asked ? { ...record, name: query.question.name } : record;
  const additionals: Answer[] = [];
  const extended = content.rcode >> 4;
  if (query.edns !== undefined)
    additionals.push({ type: 'OPT', name: '.', udpPayloadSize: EDNS_UDP_SIZE, extendedRcode: extended, ednsVersion: 0, flags: 0, flag_do: false, options: [] });
  const base = { type: 'response' as const, id: query.id, flags: replyFlags(query.flags, content.rcode), questions: [query.question], additionals };
  const bytes = dnsPacket.encode({ ...base, answers: (content.answers ?? []).map(spelled), authorities: [...(content.authorities ?? [])] });
  if (limit === undefined || bytes.length <= limit) return { bytes, truncated: false };
  return { bytes: dnsPacket.encode({ ...base, flags: base.flags | Flag.TC }), truncated: true };
}

/**
 * Where the TTL of each record of the answer and authority sections is in
 * `reply` (the additional section's OPT carries flags there, not a TTL);
 * undefined when the bytes cannot be walked.
 */
export function ttlOffsets(reply: Buffer): number[] | undefined {
  if (reply.length < HEADER_BYTES) return undefined;
  const skipName = (at: number): number | undefined => {
    while (at < reply.length) {
      const length = reply[at]!;
      if (length === 0) return at + 1;
      if ((length & 0xc0) === 0xc0) return at + 2;
      at += 1 + length;
    }
    return undefined;
  };
  let at: number | undefined = HEADER_BYTES;
  for (let q = reply.readUInt16BE(4); q > 0; q--) {
    at = skipName(at);
    if (at === undefined) return undefined;
    at += 4;
  }
  const offsets: number[] = [];
  for (let r = reply.readUInt16BE(6) + reply.readUInt16BE(8); r > 0; r--) {
    at = skipName(at);
    if (at === undefined || at + 10 > reply.length) return undefined;
    offsets.push(at + 4);
    at += 10 + reply.readUInt16BE(at + 8);
  }
  return at <= reply.length ? offsets : undefined;
}

/** The records of an answer section as the hooks see them: lower-case names, addresses and target names as text. */
export function answerRecords(answers: readonly Answer[]): AnswerRecord[] {
  const records: AnswerRecord[] = [];
  for (const record of answers) {
    if (record.type === 'OPT') continue;
    records.push({ name: normalizeName(record.name), type: record.type, ttl: record.ttl ?? 0, data: recordData(record) });
  }
  return records;
}

function recordData(record: Answer): string {
  switch (record.type) {
    case 'A':
    case 'AAAA':
      return record.data;
    case 'CNAME':
    case 'DNAME':
    case 'NS':
    case 'PTR':
      return normalizeName(record.data);
    case 'MX':
      return normalizeName(record.data.exchange);
    case 'SRV':
      return normalizeName(record.data.target);
    default:
      // Types the hooks have no use for carry no data rather than a rendering someone might parse.
      return '';
  }
}

/** Most CNAME links followed: more is a loop or an abuse, and resolvers give up far earlier (BIND: 16). */
const MAX_CHAIN = 16;

/** The names of the CNAME chain from `name` through `answers` (question name first), in order, each once. */
export function cnameChain(name: string, answers: readonly AnswerRecord[]): string[] {
  const chain = [name];
  let current = name;
  while (chain.length <= MAX_CHAIN) {
    const link = answers.find((record) => record.type === 'CNAME' && record.name === current);
    if (link === undefined || chain.includes(link.data)) break;
    chain.push(link.data);
    current = link.data;
  }
  return chain;
}

/**
 * The records of an upstream's answer section that answer `name`: the
 * CNAME that links each name of its chain to the next (the first one, as
 * `cnameChain` follows), and the records of the chain's last name. Anything
 * else is left out — a record for an unrelated name, a DNAME beside its
 * synthesised CNAME, and data beside a CNAME at the same name (which RFC
 * 1034 forbids): `a.evil CNAME api.example` with `a.evil A 6.6.6.6` must
 * not teach the sets of api.example's rules 6.6.6.6. So an upstream cannot
 * make the policy learn an address for a name nobody asked.
 */
export function relevantAnswers(name: string, answers: readonly Answer[]): { kept: Answer[]; stray: number } {
  const links = new Set<Answer>();
  const chain = new Set([name]);
  let current = name;
  for (let hops = 0; hops < MAX_CHAIN; hops++) {
    const link = answers.find((record) => record.type === 'CNAME' && normalizeName(record.name) === current);
    if (link?.type !== 'CNAME') break;
    const next = normalizeName(link.data);
    if (chain.has(next)) break;
    links.add(link);
    chain.add(next);
    current = next;
  }
  const kept = answers.filter((record) => links.has(record) || (record.type !== 'OPT' && record.type !== 'CNAME' && normalizeName(record.name) === current));
  return { kept, stray: answers.length - kept.length };
}

/** The 'null' answer for a question of type A or AAAA: the unspecified address. Undefined for other types. */
export function nullAnswer(query: Query, ttl: number): Answer[] | undefined {
  if (query.type === 'A') return [{ type: 'A', name: query.question.name, ttl, data: '0.0.0.0' }];
  if (query.type === 'AAAA') return [{ type: 'AAAA', name: query.question.name, ttl, data: '::' }];
  return undefined;
}

/** The rcode of a decoded message, with the extended bits of its OPT record. */
export function rcodeOf(packet: DecodedPacket): number {
  const opt = packet.additionals?.find((record) => record.type === 'OPT');
  return ((opt?.type === 'OPT' ? opt.extendedRcode : 0) << 4) | ((packet.flags ?? 0) & 0xf);
}

/** Flag bits used when asking upstream. */
export const QueryFlag = { RD: Flag.RD, TC: Flag.TC, QR: Flag.QR } as const;
