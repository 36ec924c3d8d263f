/**
 * The warm path: a cache hit whose addresses the table holds already is
 * answered in the same call (no promise), and every other answer still
 * waits for the kernel to take its addresses — a re-apply's new sets and an
 * element someone else deleted included.
 */
import dnsPacket from 'dns-packet';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { DnsBinding } from '../../src/compile/compile.js';
import type { ElementWrite } from '../../src/nft/set-elements.js';
import { cacheEntry, cacheKey, DnsCache } from '../../src/resolver/cache.js';
import { SetFiller, type FillView } from '../../src/resolver/fill.js';
import type { DatagramRound } from '../../src/resolver/datagrams.js';
import { resolverLimits, type ResolverLimits } from '../../src/resolver/limits.js';
import { createPipeline } from '../../src/resolver/pipeline.js';
import type { Client, ResolverHooks } from '../../src/resolver/server.js';
import type { UpstreamAnswer } from '../../src/resolver/upstream.js';
import { rcodeOf } from './dns-support.js';

const client: Client = { transport: 'udp', address: '127.0.0.1', port: 40000, local: { address: '127.0.0.153', port: 53 } };
const binding: DnsBinding = { ruleId: 'r1', verdict: 'deny', names: ['a.example'], suffixes: [], lists: [], set4: 'r1_dns4', set6: 'r1_dns6' };

const queryBytes = (id: number, name = 'a.example') =>
  dnsPacket.encode({ type: 'query', id, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: 'A', name }] });

/**
 * A round of datagrams as datagrams.ts hands one over (the transport's part
 * of the contract, tested against real sockets in datagrams.test.ts), and
 * the replies written into it.
 */
function roundOf(datagrams: readonly { bytes: Buffer; from: Client }[]) {
  const SLOT = 512;
  const data = Buffer.alloc(datagrams.length * SLOT);
  datagrams.forEach(({ bytes }, i) => bytes.copy(data, i * SLOT));
  const out = Buffer.alloc(datagrams.length * 4096);
  const placed = new Map<number, { at: number; length: number }>();
  const round: DatagramRound = {
    count: datagrams.length,
    data,
    out,
    offset: (i) => i * SLOT,
    length: (i) => datagrams[i]!.bytes.length,
    senderKey: (i) => `${datagrams[i]!.from.address}#${datagrams[i]!.from.port}`,
    sender: (i) => ({ address: datagrams[i]!.from.address, port: datagrams[i]!.from.port }),
    reply(i, bytes) {
      if (placed.has(i)) throw new Error('answered twice');
      const at = placed.size * 4096;
      bytes.copy(out, at);
      placed.set(i, { at, length: bytes.length });
      return at;
    },
  };
  /** The reply written for datagram i, if any. */
  const reply = (i: number) => {
    const p = placed.get(i);
    return p === undefined ? undefined : Buffer.from(out.subarray(p.at, p.at + p.length));
  };
  return { round, reply };
}

function setup(
  identify: ResolverHooks<string>['identify'] = () => 'someone',
  options: { keep?: boolean; ttl?: number; identifyNow?: ResolverHooks<string>['identifyNow']; limits?: Partial<ResolverLimits> } = {},
) {
  let now = 1_000_000;
  /** The kernel's set, as the writer leaves it: live set|address → expiry. Writes are acknowledged when the test says. */
  const kernel = new Map<string, number>();
  const unacked: { writes: ElementWrite[]; ack: () => void }[] = [];
  const view: FillView = {
    bindings: [binding],
    bindingsFor: (chain) => (chain.includes('a.example') ? [0] : []),
    liveNames: new Map([['r1_dns4', ['r1_dns4.0000000000000001']]]),
    ttlFloor: 60,
    ttlCap: 86_400,
  };
  const filler = new SetFiller(
    view,
    {
      add: (writes) =>
        new Promise<void>((resolve) =>
          unacked.push({
            writes: [...writes],
            ack: () => {
              for (const w of writes) kernel.set(`${w.set}|${w.address}`, now + w.timeoutMs);
              resolve();
            },
          }),
        ),
      remove: () => Promise.resolve(),
    },
    undefined,
    () => now,
  );
  const upstream = {
    query(name: string): Promise<UpstreamAnswer | undefined> {
      const message = dnsPacket.decode(
        dnsPacket.encode({
          type: 'response',
          id: 1,
          questions: [{ type: 'A', name }],
          answers: [{ type: 'A', name, ttl: options.ttl ?? 600, data: '192.0.2.7' }],
        }),
      );
      return Promise.resolve({ message, rcode: 0, bytes: 64, server: { address: '127.0.0.1', port: 53 }, transport: 'udp' } as unknown as UpstreamAnswer);
    },
  };
  const limits = resolverLimits(options.limits);
  /** How often each hook was asked, and what shape says to whom (the test may change it, as a new policy would). */
  const calls = { admit: 0, learn: 0, shape: 0 };
  const decisions = { denied: new Set<string>() };
  const cache = new DnsCache(limits, () => now);
  const pipeline = createPipeline<string>({
    hooks: {
      identify,
      admit: () => (calls.admit++, 'go'),
      learn: (question, records) => (calls.learn++, filler.learn(question, records)),
      shape: (who) => (calls.shape++, decisions.denied.has(who) ? 'nxdomain' : 'answer'),
      ...(options.keep ? { learnQuietUntil: (question, records, expiresAt) => filler.quietUntil(question, records, expiresAt) } : {}),
      ...(options.identifyNow ? { identifyNow: options.identifyNow } : {}),
    },
    upstream,
    cache,
    limits,
    now: () => now,
  });
  /** Asks; says whether the reply came before `handle` returned, and gives it when it comes. */
  const ask = (id: number, from = client) => {
    let reply: Buffer | undefined;
    pipeline.handle(queryBytes(id), from, (bytes) => {
      reply = bytes;
    });
    return { sync: reply !== undefined, reply: () => reply };
  };
  const settle = () => new Promise((resolve) => setTimeout(resolve, 5));
  /** Whether the kernel holds the address now, and for how long more (ms). */
  const held = (set = 'r1_dns4.0000000000000001') => (kernel.get(`${set}|192.0.2.7`) ?? now) - now;
  /** The first query, answered from upstream once the kernel took its address. */
  const firstAnswered = async () => {
    const first = ask(1);
    await settle();
    unacked.shift()!.ack();
    await settle();
    return first;
  };
  return { pipeline, filler, view, kernel, unacked, ask, settle, held, calls, decisions, cache, firstAnswered, tick: (ms: number) => (now += ms) };
}

describe('the warm path', () => {
  it('answers a cache hit whose address the set holds in the same call, without a write; the first answer waited for the kernel', async () => {
    const t = setup();
    const first = t.ask(1);
    expect(first.sync).toBe(false);
    await t.settle();
    // Upstream answered, the write is out, the reply is not.
    expect(t.unacked).toHaveLength(1);
    expect(first.reply()).toBeUndefined();
    t.unacked.shift()!.ack();
    await t.settle();
    expect(dnsPacket.decode(first.reply()!).answers).toHaveLength(1);
    t.tick(1000);
    const hit = t.ask(2);
    expect(hit.sync).toBe(true);
    const decoded = dnsPacket.decode(hit.reply()!);
    expect(decoded.id).toBe(2);
    expect(decoded.answers?.[0]).toMatchObject({ data: '192.0.2.7', ttl: 599 });
    expect(t.unacked).toHaveLength(0);
    expect(t.held()).toBeGreaterThanOrEqual(599_000);
    expect(t.pipeline.stats().pending).toBe(0);
  });

  it('with identify in a batch (a promise), the hit replies as identify settles: one hop, nothing after it', async () => {
    let settleWho: (who: string) => void = () => undefined;
    const t = setup(() => new Promise<string>((resolve) => (settleWho = resolve)));
    const first = t.ask(1);
    settleWho('someone');
    await t.settle();
    t.unacked.shift()!.ack();
    await t.settle();
    expect(first.reply()).toBeDefined();
    const hit = t.ask(2);
    expect(hit.sync).toBe(false);
    settleWho('someone');
    // One microtask: the identify promise's own reaction.
    await Promise.resolve();
    expect(hit.reply()).toBeDefined();
  });

  it('after a re-apply made new sets, a cache hit writes into them and answers only once the kernel took it', async () => {
    const t = setup();
    await t.firstAnswered();
    t.tick(1000);
    expect(t.ask(2).sync).toBe(true);
    // The re-apply: new live names (runtime's refreshLiveNames/update hands the filler the new view).
    t.filler.update({ ...t.view, liveNames: new Map([['r1_dns4', ['r1_dns4.0000000000000002']]]) });
    const hit = t.ask(3);
    expect(hit.sync).toBe(false);
    await t.settle();
    expect(hit.reply()).toBeUndefined();
    expect(t.unacked[0]!.writes.map((w) => [w.set, w.address])).toEqual([['r1_dns4.0000000000000002', '192.0.2.7']]);
    t.unacked.shift()!.ack();
    await t.settle();
    expect(hit.reply()).toBeDefined();
    expect(t.held('r1_dns4.0000000000000002')).toBeGreaterThanOrEqual((dnsPacket.decode(hit.reply()!).answers![0] as { ttl: number }).ttl * 1000);
  });

  it('an element deleted by someone else is written again, before the answer, once half its time is gone', async () => {
    const t = setup();
    await t.firstAnswered();
    // `nft delete element`: the kernel forgets it, the filler is not told.
    t.kernel.clear();
    t.tick(299_000);
    expect(t.ask(2).sync).toBe(true);
    t.tick(2_000);
    const hit = t.ask(3);
    expect(hit.sync).toBe(false);
    await t.settle();
    expect(hit.reply()).toBeUndefined();
    t.unacked.shift()!.ack();
    await t.settle();
    const ttl = (dnsPacket.decode(hit.reply()!).answers![0] as { ttl: number }).ttl;
    expect(ttl).toBe(299);
    expect(t.held()).toBeGreaterThanOrEqual(ttl * 1000);
  });
});

describe('a reply kept for the same query and asker', () => {
  /** A first answer learned and acknowledged, then a hit that is kept; `t.calls` counted from there. */
  async function kept(identify?: ResolverHooks<string>['identify']) {
    const t = setup(identify, { keep: true });
    await t.firstAnswered();
    // 599.5 s of the entry's 600 left: the cache gives 599 for another 500 ms.
    t.tick(500);
    expect(t.ask(2).sync).toBe(true);
    t.calls.admit = t.calls.learn = t.calls.shape = 0;
    return t;
  }
  const ttlOf = (reply: Buffer | undefined) => (dnsPacket.decode(reply!).answers![0] as { ttl: number }).ttl;

  it('is given again with the new id and the TTL left, asking no hook, for 10 s at most; then the hooks decide again', async () => {
    const t = await kept();
    t.tick(500);
    const again = t.ask(3);
    expect(again.sync).toBe(true);
    expect(dnsPacket.decode(again.reply()!).id).toBe(3);
    expect(ttlOf(again.reply())).toBe(599);
    t.tick(1);
    // What the cache gives a millisecond later: a second less.
    expect(ttlOf(t.ask(4).reply())).toBe(598);
    expect(t.calls).toEqual({ admit: 0, learn: 0, shape: 0 });
    expect(t.pipeline.stats().repliesReused).toBe(2);
    t.tick(9_499);
    expect(ttlOf(t.ask(5).reply())).toBe(589);
    expect(t.calls).toEqual({ admit: 0, learn: 0, shape: 0 });
    t.tick(1);
    expect(ttlOf(t.ask(6).reply())).toBe(589);
    expect(t.calls).toEqual({ admit: 1, learn: 1, shape: 1 });
  });

  it('is never given to another asker, whom the policy may answer otherwise', async () => {
    const t = await kept((from) => (from.port === 40000 ? 'someone' : 'denied'));
    t.decisions.denied.add('denied');
    const other = t.ask(3, { ...client, port: 40001 });
    expect(rcodeOf(dnsPacket.decode(other.reply()!))).toBe(3);
    expect(t.calls.shape).toBe(1);
  });

  it('is not given once its answer has expired, though learn would still do nothing (an element held for the floor)', async () => {
    const t = setup(undefined, { keep: true, ttl: 2 });
    await t.firstAnswered();
    t.tick(500);
    expect(t.ask(2).sync).toBe(true);
    t.tick(1500);
    // Two seconds after the answer: the cache holds nothing to give, and asks upstream.
    expect(t.ask(3).sync).toBe(false);
    expect(t.pipeline.stats().repliesReused).toBe(0);
  });

  it('is not given once the cache holds another answer for the name', async () => {
    const t = await kept();
    t.cache.set(
      cacheKey('a.example', 'A'),
      cacheEntry(
        'A',
        { rcode: 0, answers: [{ type: 'A', name: 'a.example', ttl: 300, data: '192.0.2.99' }], authorities: [] },
        64,
        1_000_500,
        resolverLimits(),
      )!,
    );
    const after = t.ask(3);
    await t.settle();
    t.unacked.shift()?.ack();
    await t.settle();
    expect((dnsPacket.decode(after.reply()!).answers![0] as { data: string }).data).toBe('192.0.2.99');
    expect(t.calls).toEqual({ admit: 1, learn: 1, shape: 1 });
  });

  it('is forgotten when told (a new policy): the next query is decided anew', async () => {
    const t = await kept();
    t.decisions.denied.add('someone');
    t.pipeline.forgetReplies();
    const after = t.ask(3);
    expect(rcodeOf(dnsPacket.decode(after.reply()!))).toBe(3);
    expect(t.calls).toEqual({ admit: 1, learn: 1, shape: 1 });
  });

  it("is not given once the filler would write again (half the element's time gone), even within the second", async () => {
    const t = setup(undefined, { keep: true });
    await t.firstAnswered();
    // Written for 601 s at 0 (600 + the rounding second): written again from 300.5 s on, inside the second the cache gives 299 in (300–301 s).
    t.tick(300_200);
    expect(t.ask(2).sync).toBe(true);
    t.tick(400);
    const late = t.ask(3);
    expect(late.sync).toBe(false);
    expect(t.unacked).toHaveLength(1);
  });
});

describe('a reply encoded once for a query', () => {
  it('answers the same bytes on the same transport only: a UDP client without EDNS gets its cut reply after a TCP client got the whole one', async () => {
    const name = 'many.example';
    const answers = Array.from({ length: 40 }, (_, i) => ({ type: 'A' as const, name, ttl: 600, data: `192.0.2.${i + 1}` }));
    const upstream = {
      query(): Promise<UpstreamAnswer | undefined> {
        const message = dnsPacket.decode(dnsPacket.encode({ type: 'response', id: 1, questions: [{ type: 'A', name }], answers }));
        return Promise.resolve({ message, rcode: 0, bytes: 700, server: { address: '127.0.0.1', port: 53 }, transport: 'udp' } as unknown as UpstreamAnswer);
      },
    };
    const limits = resolverLimits();
    const pipeline = createPipeline<string>({
      hooks: { identify: () => 'someone', admit: () => 'go', learn: () => undefined, shape: () => 'answer', learnQuietUntil: () => Infinity },
      upstream,
      cache: new DnsCache(limits, () => 1_000_000),
      limits,
      now: () => 1_000_000,
    });
    const query = dnsPacket.encode({ type: 'query', id: 7, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: 'A', name }] });
    const tcp: Client = { ...client, transport: 'tcp' };
    expect(dnsPacket.decode((await pipeline.answer(query, tcp))!).answers).toHaveLength(40);
    // A cache hit: now encoded once, kept for TCP.
    expect(dnsPacket.decode((await pipeline.answer(query, tcp))!).answers).toHaveLength(40);
    const udp = await pipeline.answer(query, client);
    expect(udp!.length).toBeLessThanOrEqual(512);
    expect(dnsPacket.decode(udp!).flag_tc).toBe(true);
  });
});

describe('kept replies written where a round of datagrams lies (answerInPlace)', () => {
  const other: Client = { ...client, port: 40001 };
  const stranger: Client = { ...client, port: 40002 };
  /** identifyNow as the resolver's: one call per round, undefined where the socket is not found. */
  const byPort = (calls: Client[][]) => (clients: readonly Client[]) => (
    calls.push([...clients]),
    clients.map((c) => (c.port === 40000 ? 'someone' : c.port === 40001 ? 'denied' : undefined))
  );

  async function keptFor(options: { limits?: Partial<ResolverLimits> } = {}) {
    const calls: Client[][] = [];
    const identify = (from: Client) => (from.port === 40000 ? 'someone' : 'denied');
    const t = setup(identify, { keep: true, identifyNow: byPort(calls), ...options });
    t.decisions.denied.add('denied');
    await t.firstAnswered();
    t.tick(500);
    expect(t.ask(2).sync).toBe(true);
    t.calls.admit = t.calls.learn = t.calls.shape = 0;
    return { ...t, identifyCalls: calls };
  }

  it("answers its asker's datagrams in place, byte for byte what handle gives, and leaves another asker's and an unknown sender's to handle", async () => {
    const t = await keptFor();
    t.tick(700);
    const { round, reply } = roundOf([
      { bytes: queryBytes(11), from: client },
      { bytes: queryBytes(12), from: other },
      { bytes: queryBytes(13), from: client },
      { bytes: queryBytes(14), from: stranger },
      { bytes: queryBytes(15, 'b.example'), from: client },
    ]);
    t.pipeline.answerInPlace(round, client.local);
    // One lookup for the round, each sender once, and only the senders of datagrams that have a kept reply.
    expect(t.identifyCalls.map((c) => c.map((x) => x.port))).toEqual([[40000, 40001, 40002]]);
    expect(t.identifyCalls[0]![0]).toEqual({ transport: 'udp', address: client.address, port: 40000, local: client.local });
    expect([1, 3, 4].map(reply)).toEqual([undefined, undefined, undefined]);
    // What the whole path makes for the same query at the same moment (a kept reply is a cached answer with the TTL left).
    const viaHandle = t.ask(11).reply()!;
    expect(reply(0)).toEqual(viaHandle);
    expect(dnsPacket.decode(reply(2)!).id).toBe(13);
    expect(reply(2)!.subarray(2)).toEqual(viaHandle.subarray(2));
    expect(t.calls).toEqual({ admit: 0, learn: 0, shape: 0 });
    // Counted as handle counts what it answers: 2 in place, and handle's own 3 (the first, the hit that was kept, the one just above).
    expect(t.pipeline.stats()).toMatchObject({ received: 5, queries: 5, repliesInPlace: 2, repliesReused: 3, pending: 0 });
    expect(t.cache.stats().hits).toBe(4);
    // The other asker, through handle: the policy's own answer (NXDOMAIN), not the kept one.
    expect(rcodeOf(dnsPacket.decode(t.ask(12, other).reply()!))).toBe(3);
  });

  it("tells a round's senders apart afresh: a sender of an earlier round is not taken for another's", async () => {
    const t = await keptFor();
    const earlier = roundOf([{ bytes: queryBytes(21), from: other }]);
    t.pipeline.answerInPlace(earlier.round, client.local);
    expect(earlier.reply(0)).toBeUndefined();
    const next = roundOf([
      { bytes: queryBytes(22), from: client },
      { bytes: queryBytes(23), from: other },
    ]);
    t.pipeline.answerInPlace(next.round, client.local);
    expect(next.reply(0)).toBeDefined();
    expect(next.reply(1)).toBeUndefined();
  });

  it('does not give a kept reply once another spelling of the question (another transport here) made the entry its own', async () => {
    const t = await keptFor();
    // The same question over TCP: a reply of its own, encoded for TCP's memo and kept on the entry in place of the UDP one.
    const tcp = await t.pipeline.answer(queryBytes(30), { ...client, transport: 'tcp' });
    expect(dnsPacket.decode(tcp!).answers).toHaveLength(1);
    const after = roundOf([{ bytes: queryBytes(31), from: client }]);
    t.pipeline.answerInPlace(after.round, client.local);
    expect(after.reply(0)).toBeUndefined();
    // handle answers it (and keeps it again for UDP).
    expect(dnsPacket.decode(t.ask(32).reply()!).answers).toHaveLength(1);
  });

  it('answers nothing in place when no datagram has a reply kept (no lookup at all), after forgetReplies, or past the 10 s', async () => {
    const t = await keptFor();
    t.pipeline.answerInPlace(roundOf([{ bytes: queryBytes(1, 'b.example'), from: client }]).round, client.local);
    expect(t.identifyCalls).toEqual([]);
    t.pipeline.forgetReplies();
    const forgotten = roundOf([{ bytes: queryBytes(2), from: client }]);
    t.pipeline.answerInPlace(forgotten.round, client.local);
    expect(forgotten.reply(0)).toBeUndefined();
    // Kept anew through handle, then its 10 s run out.
    expect(t.ask(3).sync).toBe(true);
    t.tick(10_001);
    const late = roundOf([{ bytes: queryBytes(4), from: client }]);
    t.pipeline.answerInPlace(late.round, client.local);
    expect(late.reply(0)).toBeUndefined();
    expect(t.pipeline.stats().repliesInPlace).toBe(0);
  });

  it('answers only the kept query in place: any other bytes (a byte changed anywhere but the id, cut short, grown) are left to handle', async () => {
    const t = await keptFor();
    const kept = queryBytes(40);
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(
          fc.record({ at: fc.nat(kept.length - 1), xor: fc.integer({ min: 1, max: 255 }) }).map(({ at, xor }) => {
            const changed = Buffer.from(kept);
            changed[at] = changed[at]! ^ xor;
            return changed;
          }),
          fc.nat(kept.length - 1).map((length) => kept.subarray(0, length)),
          fc.uint8Array({ minLength: 1, maxLength: 40 }).map((tail) => Buffer.concat([kept, tail])),
        ),
        async (bytes) => {
          const { round, reply } = roundOf([{ bytes, from: client }]);
          t.pipeline.answerInPlace(round, client.local);
          const placed = reply(0);
          if (bytes.length === kept.length && bytes.subarray(2).equals(kept.subarray(2))) {
            // Only the id differs: the kept reply, with this id.
            expect(placed?.readUInt16BE(0)).toBe(bytes.readUInt16BE(0));
            expect(placed!.subarray(2)).toEqual(t.ask(41).reply()!.subarray(2));
          } else expect(placed).toBeUndefined();
        },
      ),
      { numRuns: 500 },
    );
  });

  it('answers nothing in place when the lookup fails (handle identifies each again), or at the cap of queries in progress', async () => {
    const failing = setup(() => 'someone', {
      keep: true,
      identifyNow: () => {
        throw new Error('netlink is gone');
      },
    });
    await failing.firstAnswered();
    expect(failing.ask(2).sync).toBe(true);
    const first = roundOf([{ bytes: queryBytes(3), from: client }]);
    failing.pipeline.answerInPlace(first.round, client.local);
    expect(first.reply(0)).toBeUndefined();

    const t = await keptFor({ limits: { maxPending: 1 } });
    // One query in progress (its upstream answer comes on a later microtask): the cap is reached.
    t.pipeline.handle(queryBytes(7, 'slow.example'), client, () => undefined);
    expect(t.pipeline.stats().pending).toBe(1);
    const capped = roundOf([{ bytes: queryBytes(8), from: client }]);
    t.pipeline.answerInPlace(capped.round, client.local);
    expect(capped.reply(0)).toBeUndefined();
  });
});
