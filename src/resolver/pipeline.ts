/**
 * One client query, from its bytes to the reply's bytes: parse, identify
 * the client, admit the question, answer it from the cache or upstream
 * (identical questions in flight share one upstream query), let the policy
 * learn the answer before anything leaves, shape what this client gets,
 * and encode the reply. Transport-free: server.ts feeds it UDP datagrams
 * and TCP frames. Every hook failure fails closed (REFUSED before the
 * answer is known, SERVFAIL when the policy could not learn it).
 */
import type { Answer } from 'dns-packet';
import { cacheEntry, cacheKey, remainingTtl, viewOf, type CacheEntry, type CacheHold, type CachedAnswer, type DnsCache, type ReplyTemplate } from './cache.js';
import type { ResolverLimits } from './limits.js';
import {
  answerRecords,
  CLASSIC_UDP_SIZE,
  cnameChain,
  encodeReply,
  isRejection,
  nullAnswer,
  parseQuery,
  Rcode,
  relevantAnswers,
  ttlOffsets,
  type Query,
  type ReplyContent,
} from './message.js';
import type { DatagramRound, Peer } from './datagrams.js';
import type { Admission, AnswerRecord, Client, Question, ResolverHooks } from './server.js';
import type { UpstreamAnswer } from './upstream.js';
import { resolverNow } from './clock.js';
import { Shares } from './shares.js';

export interface PipelineStats {
  /** Messages received (datagrams and TCP frames). */
  readonly received: number;
  /** Messages that were queries to answer (passed parsing). */
  readonly queries: number;
  /** Messages dropped unanswered: too short for a header, a response, over the pending cap (UDP). */
  readonly dropped: number;
  readonly formErr: number;
  readonly notImp: number;
  readonly badVers: number;
  /** Queries turned away because maxPending were in progress, or maxPendingPerAsker of their asker's. */
  readonly overloaded: number;
  /** Of those, for their asker's: answered SERVFAIL. */
  readonly overloadedByAsker: number;
  /** identify() threw: answered REFUSED. */
  readonly unidentified: number;
  readonly admitRefused: number;
  readonly admitNxdomain: number;
  /** Given the null answer by admit (a name below a denied suffix, with dns.deniedAnswer "null"), without asking upstream. */
  readonly admitNull: number;
  readonly shapedNxdomain: number;
  readonly shapedNull: number;
  /** admit() or shape() threw: answered REFUSED. */
  readonly hookErrors: number;
  /** learn() threw: answered SERVFAIL. */
  readonly learnFailed: number;
  /** Queries that joined an identical one already waiting for upstream. */
  readonly coalesced: number;
  readonly servFail: number;
  /** UDP replies cut to the header and question, with TC=1. */
  readonly truncated: number;
  /** Unexpected errors inside the pipeline (answered SERVFAIL). */
  readonly internalErrors: number;
  /** Upstream answer records left out for not answering the question (owned by no name of its CNAME chain). */
  readonly strayRecords: number;
  /** Of the cache hits, those answered with a reply kept from an earlier one (same bytes, same asker, within 10 s and while learn has nothing to do). */
  readonly repliesReused: number;
  /** Of those, the UDP replies written where a round of datagrams was received (answerInPlace). */
  readonly repliesInPlace: number;
  /** Queries in progress now. */
  readonly pending: number;
}

export interface QueryPipeline {
  /** The reply to `raw` from `client` (cut to fit when the client is on UDP), or undefined to send nothing. Never rejects. */
  answer(raw: Buffer, client: Client): Promise<Buffer | undefined>;
  /**
   * The same, told to `done` exactly once. Without any promise when the hooks
   * need none: `done` is called before `handle` returns when identify
   * answers at once and the answer is a cache hit whose learn has nothing
   * to write; when identify needs its batch, right as it settles. Never throws.
   */
  handle(raw: Buffer, client: Client, done: (reply: Buffer | undefined) => void): void;
  /**
   * Answers what it can of a round of UDP datagrams where they lie: the
   * queries whose reply is kept for their asker (MemoOf.keptFor), the askers of
   * the whole round identified in one call (hooks.identifyNow), each reply
   * written straight into the round's send slots. What it does not answer
   * is left for `handle`. Nothing without hooks.identifyNow and
   * hooks.learnQuietUntil.
   */
  answerInPlace(round: DatagramRound, local: Peer): void;
  /** No reply kept from before is given again (see ResolverHooks.learnQuietUntil). */
  forgetReplies(): void;
  stats(): PipelineStats;
}

export interface PipelineDeps<Who> {
  readonly hooks: ResolverHooks<Who>;
  readonly upstream: { query(name: string, type: string): Promise<UpstreamAnswer | undefined> };
  readonly cache: DnsCache;
  readonly limits: ResolverLimits;
  readonly now?: () => number;
  /** Told of unexpected errors (a bug, not bad input): the query got SERVFAIL. */
  readonly onError?: (error: unknown) => void;
  /** Who counts as one asker for maxPendingPerAsker (runtime.ts: a user, its subordinate uids folded in, owner.ts); undefined: no cap per asker. */
  readonly askerKey?: (who: Who) => string;
}

/** An answer the client may get, before shaping. */
interface Resolved {
  readonly view: CachedAnswer;
  readonly records: readonly AnswerRecord[];
}

/**
 * A query seen before (its bytes but the id, and the transport): how it
 * parsed, and what the path needs of it, made once; and the last reply made
 * for it from a cache hit, while that may be given again to the same asker
 * (hooks.learnQuietUntil). Those are plain fields of the memo, not an object
 * of their own: the warm path reads them for every query.
 */
interface MemoOf<Who> {
  /** Its id is the first asker's: a reply takes the id of the query it answers. */
  readonly query: Query;
  readonly question: Question;
  readonly cacheKey: string;
  /** Who the kept reply is for; undefined: none is kept. */
  keptFor: Who | undefined;
  /** Where the cache keeps the entry it was made from (the entry's template is the reply): it must not keep the entry alive past the cache's bounds. */
  keptHold: CacheHold | undefined;
  /** Last time (the pipeline's clock) it may be given: learn would still do nothing, and the answer is learned again at least this often (KEEP_MS). */
  keptUntil: number;
  /** forgetReplies() calls when it was made. */
  keptEpoch: number;
}

/** Queries kept parsed per transport, the oldest forgotten first: more than the names a busy machine asks about again and again. */
const MEMOS = 16_384;
const MEMO_QUERY_BYTES = 512;
const MEMO_REPLY_BYTES = 1232;
const TC_FLAG = 0x0200;
/**
 * The longest a reply is given again without going through admit, learn
 * and shape: the address memory hears of an answer at least this often
 * (its recency, under its cap, is that of the answers it learns).
 */
const KEEP_MS = 10_000;

type Resolution = Resolved | { readonly failed: 'upstream' | 'learn' };

/** The memo key of a message lying at `data[offset, offset + length)`: its bytes but the id; undefined for one no memo is kept for. */
function memoKeyOf(data: Buffer, offset: number, length: number): string | undefined {
  return length >= 12 && length <= MEMO_QUERY_BYTES ? data.toString('latin1', offset + 2, offset + length) : undefined;
}

/** A copy of `template` lying in `target` from `at`, given this query's id and the TTL `ttl`. */
function patchTemplate(target: Buffer, at: number, template: ReplyTemplate, id: number, ttl: number): void {
  target.writeUInt16BE(id, at);
  for (const ttlAt of template.ttlAt) target.writeUInt32BE(ttl, at + ttlAt);
}
type Done = (reply: Buffer | undefined) => void;

/** 0.0.0.0 or ::, and NXDOMAIN for a type that has no null answer. */
function nullReply(query: Query, ttl: number): ReplyContent {
  const answers: Answer[] | undefined = nullAnswer(query, ttl);
  return answers === undefined ? { rcode: Rcode.NxDomain } : { rcode: Rcode.NoError, answers };
}

function isThenable<T>(value: T | PromiseLike<T>): value is PromiseLike<T> {
  return typeof (value as { then?: unknown } | undefined)?.then === 'function';
}

export function createPipeline<Who>(deps: PipelineDeps<Who>): QueryPipeline {
  const { hooks, cache, limits } = deps;
  const now = deps.now ?? resolverNow;
  const counts = {
    received: 0,
    queries: 0,
    dropped: 0,
    formErr: 0,
    notImp: 0,
    badVers: 0,
    overloaded: 0,
    overloadedByAsker: 0,
    unidentified: 0,
    admitRefused: 0,
    admitNxdomain: 0,
    admitNull: 0,
    shapedNxdomain: 0,
    shapedNull: 0,
    hookErrors: 0,
    learnFailed: 0,
    coalesced: 0,
    servFail: 0,
    truncated: 0,
    internalErrors: 0,
    strayRecords: 0,
    repliesReused: 0,
    repliesInPlace: 0,
  };
  /** Bumped by forgetReplies: a kept reply of an older epoch is not given. */
  let epoch = 0;
  let pending = 0;
  type Memo = MemoOf<Who>;
  /** By transport, then by the query's bytes but its id (a key without the transport's name: no string is joined per query). */
  const memosBy = { udp: new Map<string, Memo>(), tcp: new Map<string, Memo>() };
  const recordsOf = new WeakMap<CachedAnswer, AnswerRecord[]>();
  /** Each answer's CNAME chain, asked of its records once. */
  const chains = new WeakMap<readonly AnswerRecord[], string[]>();
  const pendingByAsker = new Shares(limits.maxPendingPerAsker);
  const inFlight = new Map<string, Promise<Resolution>>();

  const learn = async (question: Question, records: readonly AnswerRecord[], fromCache: boolean): Promise<boolean> => {
    try {
      await hooks.learn(question, records, fromCache);
      return true;
    } catch {
      counts.learnFailed++;
      return false;
    }
  };

  /** Asks upstream once for everyone asking `key` meanwhile; learns the answer before any of them may reply, then caches it. */
  const fromUpstream = async (query: Query, question: Question, key: string): Promise<Resolution> => {
    const answer = await deps.upstream.query(query.name, query.type);
    if (answer === undefined || (answer.rcode !== Rcode.NoError && answer.rcode !== Rcode.NxDomain)) return { failed: 'upstream' };
    const { kept, stray } = relevantAnswers(query.name, answer.message.answers ?? []);
    counts.strayRecords += stray;
    const message = { rcode: answer.rcode, answers: kept, authorities: answer.message.authorities ?? [] };
    const received = now();
    const entry = cacheEntry(query.type, message, answer.bytes, received, limits);
    // An answer that may not be cached (TTL 0, negative without SOA) goes to the clients waiting for it as it came.
    const view: CachedAnswer = entry
      ? viewOf(entry, received)
      : {
          rcode: message.rcode,
          answers: message.answers.filter((record) => record.type !== 'OPT'),
          authorities: message.authorities.filter((record) => record.type === 'SOA'),
          ttl: 0,
        };
    const records = answerRecords(view.answers);
    if (!(await learn(question, records, false))) return { failed: 'learn' };
    if (entry) cache.set(key, entry);
    return { view, records };
  };

  /** Asks upstream (or joins who already asks); `then` gets the resolution. */
  const fromUpstreamOnce = (query: Query, question: Question, key: string): Promise<Resolution> => {
    const waiting = inFlight.get(key);
    if (waiting !== undefined) {
      counts.coalesced++;
      return waiting;
    }
    const asked = fromUpstream(query, question, key).catch((error: unknown): Resolution => {
      counts.internalErrors++;
      deps.onError?.(error);
      return { failed: 'upstream' };
    });
    inFlight.set(key, asked);
    const forget = (): void => {
      inFlight.delete(key);
    };
    void asked.then(forget, forget);
    return asked;
  };

  const reply = (query: Query, id: number, client: Client, content: ReplyContent): Buffer => {
    if (content.rcode === Rcode.ServFail) counts.servFail++;
    const limit = client.transport === 'udp' ? (query.edns?.udpPayloadSize ?? CLASSIC_UDP_SIZE) : 65535;
    const { bytes, truncated } = encodeReply(query.id === id ? query : { ...query, id }, content, limit);
    if (truncated) counts.truncated++;
    return bytes;
  };

  /** What went wrong where nothing should have: SERVFAIL, if even that can be encoded. */
  const failed = (query: Query, id: number, client: Client, finish: Done, error: unknown): void => {
    counts.internalErrors++;
    deps.onError?.(error);
    let bytes: Buffer | undefined;
    try {
      bytes = reply(query, id, client, { rcode: Rcode.ServFail });
    } catch {
      bytes = undefined;
    }
    finish(bytes);
  };

  // The path below is in continuation style, not async functions: a step whose hook answered at once goes on in the same call, so a warm cache hit costs no promise.

  const answerQuery = (query: Query, id: number, client: Client, memo: Memo | undefined, finish: Done): void => {
    // RFC 6891 §6.1.3: an EDNS version this resolver does not speak is answered BADVERS, and nothing else.
    if (query.edns !== undefined && query.edns.version > 0) {
      counts.badVers++;
      finish(reply(query, id, client, { rcode: Rcode.BadVers }));
      return;
    }
    let identified: Who | PromiseLike<Who>;
    try {
      identified = hooks.identify(client);
    } catch {
      counts.unidentified++;
      finish(reply(query, id, client, { rcode: Rcode.Refused }));
      return;
    }
    if (!isThenable(identified)) {
      answerIdentified(query, id, client, memo, identified, finish);
      return;
    }
    identified.then(
      (who) => {
        try {
          answerIdentified(query, id, client, memo, who, finish);
        } catch (error) {
          failed(query, id, client, finish, error);
        }
      },
      () => {
        counts.unidentified++;
        try {
          finish(reply(query, id, client, { rcode: Rcode.Refused }));
        } catch (error) {
          failed(query, id, client, finish, error);
        }
      },
    );
  };

  /** The template's bytes with this query's id and `ttl`. */
  const fromTemplate = (template: ReplyTemplate, id: number, ttl: number): Buffer => {
    const bytes = Buffer.from(template.bytes);
    patchTemplate(bytes, 0, template, id, ttl);
    return bytes;
  };

  /**
   * The cache entry whose template is `memo`'s kept reply, if that may be
   * given to `who` at `at` (the reply's epoch, its time, the entry still
   * stored with a second or more left), counted as the cache hit it
   * answers; otherwise undefined.
   */
  const keptEntry = (memo: Memo, who: Who, at: number): CacheEntry | undefined => {
    if (memo.keptFor !== who || memo.keptEpoch !== epoch || at > memo.keptUntil) return undefined;
    const hold = memo.keptHold!;
    if (hold.entry?.template?.memo !== memo) return undefined;
    return cache.reuse(hold, at);
  };

  const answerIdentified = (query: Query, id: number, client: Client, memo: Memo | undefined, who: Who, finish: Done): void => {
    // The same bytes from the same asker, answered from the cache before, while learn has nothing to do: that reply again, with the TTL left.
    // Before the cap per asker: a reply given at once holds no slot (the full path would refuse an asker at its cap).
    if (memo?.keptFor !== undefined) {
      const at = now();
      const entry = keptEntry(memo, who, at);
      if (entry !== undefined) {
        counts.repliesReused++;
        finish(fromTemplate(entry.template!, id, remainingTtl(entry, at)));
        return;
      }
      // Stale, or another asker's: not kept any longer.
      memo.keptFor = memo.keptHold = undefined;
    }
    const asker = deps.askerKey?.(who);
    if (asker === undefined) {
      answerAdmitted(query, id, client, memo, who, finish);
      return;
    }
    if (!pendingByAsker.take(asker)) {
      counts.overloaded++;
      counts.overloadedByAsker++;
      finish(reply(query, id, client, { rcode: Rcode.ServFail }));
      return;
    }
    let released = false;
    const done = (bytes: Buffer | undefined): void => {
      if (!released) {
        released = true;
        pendingByAsker.give(asker);
      }
      finish(bytes);
    };
    try {
      answerAdmitted(query, id, client, memo, who, done);
    } catch (error) {
      failed(query, id, client, done, error);
    }
  };

  const answerAdmitted = (query: Query, id: number, client: Client, memo: Memo | undefined, who: Who, finish: Done): void => {
    const question: Question = memo?.question ?? { name: query.name, type: query.type };
    let admission: Admission;
    try {
      admission = hooks.admit(who, question);
    } catch {
      counts.hookErrors++;
      finish(reply(query, id, client, { rcode: Rcode.Refused }));
      return;
    }
    if (admission === 'refused') {
      counts.admitRefused++;
      finish(reply(query, id, client, { rcode: Rcode.Refused }));
      return;
    }
    if (admission === 'nxdomain') {
      counts.admitNxdomain++;
      finish(reply(query, id, client, { rcode: Rcode.NxDomain }));
      return;
    }
    if (admission === 'null') {
      counts.admitNull++;
      finish(reply(query, id, client, nullReply(query, limits.nullTtl)));
      return;
    }
    const key = memo?.cacheKey ?? cacheKey(query.name, query.type);
    const cached = cache.get(key);
    if (cached === undefined) {
      void fromUpstreamOnce(query, question, key).then((resolution) => settled(query, id, client, memo, who, question, resolution, finish));
      return;
    }
    let records = recordsOf.get(cached);
    if (records === undefined) recordsOf.set(cached, (records = answerRecords(cached.answers)));
    const resolved: Resolved = { view: cached, records };
    let learning: void | Promise<void>;
    try {
      learning = hooks.learn(question, records, true);
    } catch {
      counts.learnFailed++;
      finish(reply(query, id, client, { rcode: Rcode.ServFail }));
      return;
    }
    // Nothing to wait for (the table holds every address already): the reply goes now, in this call.
    if (!isThenable(learning)) {
      finish(shaped(query, id, client, memo, who, question, resolved, true));
      return;
    }
    learning.then(
      () => settled(query, id, client, memo, who, question, resolved, finish),
      () => {
        counts.learnFailed++;
        settled(query, id, client, memo, who, question, { failed: 'learn' }, finish);
      },
    );
  };

  /** After a promise: the same as the synchronous path, with what it throws answered SERVFAIL. */
  const settled = (
    query: Query,
    id: number,
    client: Client,
    memo: Memo | undefined,
    who: Who,
    question: Question,
    resolution: Resolution,
    finish: Done,
  ): void => {
    try {
      finish(shaped(query, id, client, memo, who, question, resolution));
    } catch (error) {
      failed(query, id, client, finish, error);
    }
  };

  /** The reply to an answer the table has learned: what this client gets of it. `keep`: a cache hit learned at once, whose reply may be kept (MemoOf.keptFor). */
  const shaped = (
    query: Query,
    id: number,
    client: Client,
    memo: Memo | undefined,
    who: Who,
    question: Question,
    resolution: Resolution,
    keep = false,
  ): Buffer => {
    if ('failed' in resolution) return reply(query, id, client, { rcode: Rcode.ServFail });
    const { view, records } = resolution;
    let chain = chains.get(records);
    if (chain === undefined) chains.set(records, (chain = cnameChain(query.name, records)));
    let shape: 'answer' | 'nxdomain' | 'null';
    try {
      shape = hooks.shape(who, question, chain);
    } catch {
      counts.hookErrors++;
      return reply(query, id, client, { rcode: Rcode.Refused });
    }
    if (shape === 'nxdomain') {
      counts.shapedNxdomain++;
      return reply(query, id, client, { rcode: Rcode.NxDomain });
    }
    if (shape === 'null' && view.rcode === Rcode.NoError) {
      counts.shapedNull++;
      return reply(query, id, client, nullReply(query, limits.nullTtl));
    }
    if (hooks.answered !== undefined && records.length > 0) {
      try {
        hooks.answered(who, question, records);
      } catch (error) {
        deps.onError?.(error);
      }
    }
    // The same question, spelled and flagged the same, answered from the same cache entry: the bytes encoded for it before, with this query's id and the TTL that remains now.
    let template = memo === undefined ? undefined : view.entry?.template;
    let bytes: Buffer;
    if (template !== undefined && template.memo === memo) bytes = fromTemplate(template, id, view.ttl);
    else {
      template = undefined;
      bytes = reply(query, id, client, { rcode: view.rcode, answers: view.answers, authorities: view.authorities });
      if (memo !== undefined && view.entry !== undefined && bytes.length <= MEMO_REPLY_BYTES && (bytes.readUInt16BE(2) & TC_FLAG) === 0) {
        const ttlAt = ttlOffsets(bytes);
        if (ttlAt !== undefined) view.entry.template = template = { memo, bytes, ttlAt };
      }
    }
    if (keep && template !== undefined && memo !== undefined && view.hold !== undefined && hooks.learnQuietUntil !== undefined)
      keepReply(memo, who, question, resolution, view.hold, template);
    return bytes;
  };

  /**
   * Keeps a reply just made from a cache hit while learn would do nothing
   * (at most KEEP_MS). Given again later, it carries the TTL the cache
   * would give then: the same bytes the path would make, since what admit
   * and shape decide does not depend on the TTL, and learn for the entry's
   * records as their TTL counts down does nothing until then
   * (learnQuietUntil's promise).
   */
  const keepReply = (memo: Memo, who: Who, question: Question, resolved: Resolved, hold: CacheHold, template: ReplyTemplate): void => {
    memo.keptFor = memo.keptHold = undefined;
    const entry = hold.entry;
    if (entry === undefined) return;
    let quiet: number;
    try {
      quiet = hooks.learnQuietUntil!(question, resolved.records, entry.expiresAt);
    } catch (error) {
      deps.onError?.(error);
      return;
    }
    const at = now();
    const until = Math.min(quiet, at + KEEP_MS);
    // Still stored, and its template still this reply (learnQuietUntil may have let another query's reply replace it meanwhile).
    if (until > at && hold.entry === entry && entry.template === template) {
      memo.keptFor = who;
      memo.keptHold = hold;
      memo.keptUntil = until;
      memo.keptEpoch = epoch;
    }
  };

  // answerInPlace's working arrays, kept between rounds (a round is at most what one recvmmsg takes).
  const roundMemos: (Memo | undefined)[] = [];
  const roundIndex: number[] = [];
  const roundSender: number[] = [];
  const senderSlots = new Map<number | string, number>();
  const roundClients: Client[] = [];

  const answerInPlace = (round: DatagramRound, local: Peer): void => {
    // At the cap of queries in progress, handle drops UDP queries and counts them: its to do. (Within a round, the queries handle
    // takes meanwhile may reach the cap; a kept reply holds no slot, as on handle's own kept path, so those answered here need none.)
    if (hooks.identifyNow === undefined || hooks.learnQuietUntil === undefined || pending >= limits.maxPending) return;
    const memos = memosBy.udp;
    // Which datagrams may have a kept reply (a cheap look first: a round without one asks sock_diag nothing).
    const first = now();
    let candidates = 0;
    for (let i = 0; i < round.count; i++) {
      const key = memoKeyOf(round.data, round.offset(i), round.length(i));
      const memo = key === undefined ? undefined : memos.get(key);
      if (memo?.keptFor === undefined || memo.keptEpoch !== epoch || first > memo.keptUntil) continue;
      roundMemos[candidates] = memo;
      roundIndex[candidates] = i;
      candidates++;
    }
    if (candidates === 0) return;
    try {
      // Who asks, once per sender of the round, looked up after all its datagrams arrived (as identifyInBatch would).
      for (let c = 0; c < candidates; c++) {
        const key = round.senderKey(roundIndex[c]!);
        let slot = senderSlots.get(key);
        if (slot === undefined) {
          slot = roundClients.length;
          senderSlots.set(key, slot);
          const peer = round.sender(roundIndex[c]!);
          roundClients.push({ transport: 'udp', address: peer.address, port: peer.port, local });
        }
        roundSender[c] = slot;
      }
      let whos: readonly (Who | undefined)[];
      try {
        whos = hooks.identifyNow(roundClients);
      } catch {
        // handle identifies each again, and answers what it cannot.
        return;
      }
      // After the lookup, as handle's kept path reads the clock after identify.
      const at = now();
      for (let c = 0; c < candidates; c++) {
        const who = whos[roundSender[c]!];
        // Another asker's, or gone meanwhile: handle's (which forgets a kept reply that is not this asker's).
        const entry = who === undefined ? undefined : keptEntry(roundMemos[c]!, who, at);
        if (entry === undefined) continue;
        const template = entry.template!;
        const i = roundIndex[c]!;
        // Everything the copy needs is known before it is placed: once placed it is sent, edited or not.
        const id = round.data.readUInt16BE(round.offset(i));
        const ttl = remainingTtl(entry, at);
        patchTemplate(round.out, round.reply(i, template.bytes), template, id, ttl);
        counts.received++;
        counts.queries++;
        counts.repliesReused++;
        counts.repliesInPlace++;
      }
    } finally {
      // Nothing of this round is held past it.
      roundMemos.fill(undefined, 0, candidates);
      senderSlots.clear();
      roundClients.length = 0;
    }
  };

  const handle = (raw: Buffer, client: Client, done: Done): void => {
    counts.received++;
    // A query's bytes but its id decide everything parseQuery says: the same bytes again (a client asking a name it asked before) are not decoded again.
    const memos = memosBy[client.transport];
    const memoKey = memoKeyOf(raw, 0, raw.length);
    let memo = memoKey === undefined ? undefined : memos.get(memoKey);
    let query: Query;
    if (memo !== undefined) query = memo.query;
    else {
      const parsed = parseQuery(raw);
      if ('drop' in parsed) {
        counts.dropped++;
        done(undefined);
        return;
      }
      if (isRejection(parsed)) {
        if (parsed.rcode === Rcode.NotImp) counts.notImp++;
        else counts.formErr++;
        done(parsed.reply);
        return;
      }
      query = parsed;
      if (memoKey !== undefined) {
        if (memos.size >= MEMOS) memos.delete(memos.keys().next().value!);
        memo = {
          query,
          question: { name: query.name, type: query.type },
          cacheKey: cacheKey(query.name, query.type),
          keptFor: undefined,
          keptHold: undefined,
          keptUntil: 0,
          keptEpoch: 0,
        };
        memos.set(memoKey, memo);
      }
    }
    const id = raw.readUInt16BE(0);
    counts.queries++;
    if (pending >= limits.maxPending) {
      counts.overloaded++;
      // A UDP client asks again; a TCP client waits for its answer, so it gets one.
      if (client.transport === 'udp') {
        counts.dropped++;
        done(undefined);
        return;
      }
      done(reply(query, id, client, { rcode: Rcode.ServFail }));
      return;
    }
    pending++;
    let finished = false;
    const finish = (bytes: Buffer | undefined): void => {
      if (finished) return;
      finished = true;
      pending--;
      done(bytes);
    };
    try {
      answerQuery(query, id, client, memo, finish);
    } catch (error) {
      failed(query, id, client, finish, error);
    }
  };

  return {
    answer: (raw, client) => new Promise<Buffer | undefined>((resolve) => handle(raw, client, resolve)),
    handle,
    answerInPlace,
    forgetReplies: () => {
      epoch++;
    },
    stats: () => ({ ...counts, pending }),
  };
}
