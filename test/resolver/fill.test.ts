import dnsPacket from 'dns-packet';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import type { DnsBinding } from '../../src/compile/compile.js';
import type { ElementRemoval, ElementWrite } from '../../src/nft/set-elements.js';
import { SetFiller, type FillView } from '../../src/resolver/fill.js';
import { answerRecords, cnameChain, relevantAnswers } from '../../src/resolver/message.js';
import { AddressMemory } from '../../src/resolver/memory.js';
import type { AnswerRecord } from '../../src/resolver/server.js';

/** What the table learns from answers, against a recording writer and a clock the test moves. */
function binding(ruleId: string, names: string[], extra: Partial<DnsBinding> = {}): DnsBinding {
  return { ruleId, verdict: 'deny', names, suffixes: [], lists: [], set4: `${ruleId}_dns4`, set6: `${ruleId}_dns6`, ...extra };
}

function setup(bindings: DnsBinding[], live: Record<string, string[]> = {}, add?: (writes: readonly ElementWrite[]) => Promise<void>) {
  let now = 1_000_000;
  const writes: ElementWrite[][] = [];
  const removals: ElementRemoval[][] = [];
  const memory = new AddressMemory({ now: () => now });
  const view: FillView = {
    bindings,
    bindingsFor: (chain) => bindings.flatMap((b, i) => (chain.some((name) => b.names.includes(name)) ? [i] : [])),
    liveNames: new Map(bindings.flatMap((b) => [b.set4, b.set6].map((set) => [set, live[set] ?? [`${set}.0123456789abcdef`]]))),
    ttlFloor: 60,
    ttlCap: 3600,
  };
  const filler = new SetFiller(
    view,
    {
      add: (w) => (writes.push([...w]), add ? add(w) : Promise.resolve()),
      remove: (r) => (removals.push([...r]), Promise.resolve()),
    },
    memory,
    () => now,
  );
  const answer = async (question: string, records: AnswerRecord[]) => {
    memory.rememberAnswer(question, records);
    await filler.learn({ name: question, type: 'A' }, records);
  };
  return { filler, writes, removals, answer, tick: (ms: number) => (now += ms), view };
}

const a = (name: string, data: string, ttl = 300): AnswerRecord => ({ name, type: 'A', ttl, data });
const cname = (name: string, data: string, ttl = 300): AnswerRecord => ({ name, type: 'CNAME', ttl, data });
const aaaa = (name: string, data: string, ttl = 300): AnswerRecord => ({ name, type: 'AAAA', ttl, data });

describe('what an answer teaches the table', () => {
  it('follows the CNAME chain from the question, and stops at a loop', () => {
    expect(cnameChain('a.example', [cname('a.example', 'b.cdn.example'), cname('b.cdn.example', 'c.cdn.example'), a('c.cdn.example', '192.0.2.1')])).toEqual([
      'a.example',
      'b.cdn.example',
      'c.cdn.example',
    ]);
    expect(cnameChain('x.example', [cname('x.example', 'y.example'), cname('y.example', 'x.example')])).toEqual(['x.example', 'y.example']);
  });

  it('takes from an upstream only the links of the chain and the records of its last name: data beside a CNAME teaches nothing', () => {
    const answers = [
      cname('q.evil.example', 'api.example'),
      a('q.evil.example', '203.0.113.66'),
      cname('q.evil.example', 'other.example'),
      a('api.example', '192.0.2.7'),
      a('unrelated.example', '192.0.2.8'),
    ];
    const { kept, stray } = relevantAnswers('q.evil.example', answers as never);
    expect(kept).toEqual([answers[0], answers[3]]);
    expect(stray).toBe(3);
  });

  it('puts an address into the set of every rule naming any name of its chain, with the TTL held within floor and cap, in every live set of that name', async () => {
    const { writes, answer } = setup([binding('r1', ['a.example']), binding('r2', ['edge.cdn.example']), binding('r3', ['other.example'])], {
      r2_dns4: ['r2_dns4.aaaa', 'r2_dns4.bbbb'],
    });
    await answer('a.example', [cname('a.example', 'edge.cdn.example'), a('edge.cdn.example', '192.0.2.7', 5)]);
    expect(writes).toHaveLength(1);
    expect(writes[0]!.map((w) => [w.set, w.address, w.timeoutMs])).toEqual([
      ['r1_dns4.0123456789abcdef', '192.0.2.7', 60_000],
      ['r2_dns4.aaaa', '192.0.2.7', 60_000],
      ['r2_dns4.bbbb', '192.0.2.7', 60_000],
    ]);
    await answer('other.example', [a('other.example', '192.0.2.8', 100_000)]);
    expect(writes[1]!.map((w) => w.timeoutMs)).toEqual([3_600_000]);
  });

  it('skips a write the kernel does not need (a warm cache) and renews an element before it would run out', async () => {
    const { writes, answer, tick } = setup([binding('r1', ['a.example'])]);
    await answer('a.example', [a('a.example', '192.0.2.7', 300)]);
    tick(10_000);
    // The cache hands out what is left of the TTL: the element outlives it.
    await answer('a.example', [a('a.example', '192.0.2.7', 290)]);
    expect(writes).toHaveLength(1);
    tick(200_000);
    // A new answer from upstream would outlive the element: renewed.
    await answer('a.example', [a('a.example', '192.0.2.7', 300)]);
    expect(writes).toHaveLength(2);
  });

  it('a sparing rule leaves out an address that also answers a name it does not deny, and takes it out again', async () => {
    const { writes, removals, answer } = setup([binding('r1', ['tracker.example'], { sharedAddresses: 'spare' }), binding('r2', ['ads.example'])]);
    await answer('page.example', [a('page.example', '192.0.2.9')]);
    await answer('tracker.example', [a('tracker.example', '192.0.2.9')]);
    expect(writes).toEqual([]);
    await answer('tracker.example', [a('tracker.example', '192.0.2.10')]);
    await answer('ads.example', [a('ads.example', '192.0.2.10')]);
    expect(writes.flat().map((w) => [w.set.split('.')[0], w.address])).toEqual([
      ['r1_dns4', '192.0.2.10'],
      ['r2_dns4', '192.0.2.10'],
    ]);
    // ads.example is denied too, but not by r1: r1 spares the address, r2 (which does not spare) keeps it.
    expect(removals).toEqual([[{ set: 'r1_dns4.0123456789abcdef', address: '192.0.2.10' }]]);
  });

  it('puts an IPv4-mapped AAAA into the IPv4 set, as the address the kernel sends to, with the timeouts of any answer', async () => {
    const { writes, removals, answer, tick } = setup([binding('r1', ['a.example']), binding('r2', ['tracker.example'], { sharedAddresses: 'spare' })]);
    await answer('a.example', [aaaa('a.example', '::ffff:192.0.2.7', 5), aaaa('a.example', '2001:db8::7', 5)]);
    expect(writes.flat().map((w) => [w.set, w.address, w.timeoutMs])).toEqual([
      ['r1_dns4.0123456789abcdef', '192.0.2.7', 60_000],
      ['r1_dns6.0123456789abcdef', '2001:db8::7', 60_000],
    ]);
    // Another spelling of the same address, or its A record, is the same element: the kernel holds it already.
    tick(1000);
    await answer('a.example', [aaaa('a.example', '0:0:0:0:0:FFFF:C000:0207', 5), a('a.example', '192.0.2.7', 5)]);
    expect(writes).toHaveLength(1);
    // A sparing rule takes it out of its IPv4 set when a name it does not deny answers it, whichever family that answer spells it in.
    await answer('tracker.example', [aaaa('tracker.example', '::ffff:192.0.2.9')]);
    await answer('page.example', [a('page.example', '192.0.2.9')]);
    expect(writes.at(-1)!.map((w) => [w.set, w.address])).toEqual([['r2_dns4.0123456789abcdef', '192.0.2.9']]);
    expect(removals).toEqual([[{ set: 'r2_dns4.0123456789abcdef', address: '192.0.2.9' }]]);
  });

  it("learns no address from an HTTPS record's ipv4hint and ipv6hint: only A and AAAA records are the answer's addresses", async () => {
    const { writes, answer } = setup([binding('r1', ['svc.example'])]);
    // svc.example. 300 IN HTTPS 1 . ipv4hint=192.0.2.99 ipv6hint=2001:db8::99, as an upstream sends it.
    const name = Buffer.from([3, ...Buffer.from('svc'), 7, ...Buffer.from('example'), 0]);
    const rdata = Buffer.concat([
      Buffer.from([0, 1, 0]),
      Buffer.from([0, 4, 0, 4, 192, 0, 2, 99]),
      Buffer.from([0, 6, 0, 16, 0x20, 0x01, 0x0d, 0xb8, ...Array<number>(11).fill(0), 0x99]),
    ]);
    const rr = Buffer.alloc(10);
    rr.writeUInt16BE(65, 0);
    rr.writeUInt16BE(1, 2);
    rr.writeUInt32BE(300, 4);
    rr.writeUInt16BE(rdata.length, 8);
    const message = Buffer.concat([Buffer.from([0, 1, 0x81, 0x80, 0, 0, 0, 1, 0, 0, 0, 0]), name, rr, rdata]);
    const records = answerRecords(dnsPacket.decode(message).answers ?? []);
    expect(records).toHaveLength(1);
    expect(records[0]!.data).toBe('');
    await answer('svc.example', records);
    expect(writes).toEqual([]);
  });

  it('after a re-apply, puts what it remembers into sets made anew', async () => {
    const { filler, writes, answer, view } = setup([binding('r1', ['a.example'])]);
    await answer('a.example', [a('a.example', '192.0.2.7', 300)]);
    const memory = new AddressMemory();
    memory.rememberAnswer('a.example', [a('a.example', '192.0.2.7', 300)]);
    filler.update({ ...view, liveNames: new Map([['r1_dns4', ['r1_dns4.ffff']]]) });
    expect(await filler.relearn(memory.chains())).toBe(1);
    expect(writes.at(-1)!.map((w) => w.set)).toEqual(['r1_dns4.ffff']);
  });
  it('answers a warm hit at once (no promise) when the kernel holds every element as long as the answer asks, and never when one would run out before its TTL', async () => {
    const { filler, writes, answer, tick } = setup([binding('r1', ['a.example'])]);
    await answer('a.example', [a('a.example', '192.0.2.7', 300)]);
    tick(10_000);
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 290)])).toBeUndefined();
    // Written for 301 s (the second a cached TTL is rounded down by): an answer of 291 s is held too.
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 291)])).toBeUndefined();
    // A TTL the element would not outlive (one more second than it holds): written, and awaited.
    const longer = filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 292)]);
    expect(longer).toBeInstanceOf(Promise);
    await longer;
    expect(writes.map((w) => w.map((x) => x.timeoutMs))).toEqual([[301_000], [293_000]]);
  });

  it('a re-apply (new live names) forgets what was written: the next hit writes into the new set before it answers', async () => {
    const { filler, writes, answer, tick, view } = setup([binding('r1', ['a.example'])]);
    const records = [a('a.example', '192.0.2.7', 300)];
    await answer('a.example', records);
    tick(1000);
    const hit = [a('a.example', '192.0.2.7', 299)];
    expect(filler.learn({ name: 'a.example', type: 'A' }, hit)).toBeUndefined();
    filler.update({ ...view, liveNames: new Map([['r1_dns4', ['r1_dns4.ffff']]]) });
    // The same records array as before the update (its plan named the old set): planned again.
    const again = filler.learn({ name: 'a.example', type: 'A' }, hit);
    expect(again).toBeInstanceOf(Promise);
    await again;
    expect(writes.at(-1)!.map((w) => [w.set, w.timeoutMs])).toEqual([['r1_dns4.ffff', 300_000]]);
  });

  it('a cache entry first written long after it was stored (after a re-apply) is written once, not again each second as its TTL counts down', async () => {
    const { filler, writes, tick, view } = setup([binding('r1', ['a.example'])]);
    filler.update({ ...view });
    // The entry expires at a time that is no whole number of seconds from the first hit; the cache rounds what is left down.
    let left = 3_599_700;
    const hits: (Promise<void> | undefined)[] = [];
    for (let i = 0; i < 100; i++) {
      hits.push(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', Math.floor(left / 1000))]));
      await hits.at(-1);
      tick(130);
      left -= 130;
    }
    // Once: an element written for exactly the TTL it was given would fall short of the next second's hits, and be written again about once a second.
    expect(writes.map((w) => w.map((x) => x.timeoutMs))).toEqual([[3_600_000]]);
    expect(hits.filter((hit) => hit !== undefined)).toHaveLength(1);
  });

  it('an element deleted by hand (nothing tells the filler) is written again by the first answer after half its time is gone', async () => {
    const { filler, writes, answer, tick } = setup([binding('r1', ['a.example'])]);
    await answer('a.example', [a('a.example', '192.0.2.7', 600)]);
    // `nft delete element` here: the filler's record still says it is there, so hits answer at once for a bounded time.
    tick(299_000);
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 301)])).toBeUndefined();
    tick(2_000);
    const recheck = filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 299)]);
    expect(recheck).toBeInstanceOf(Promise);
    await recheck;
    expect(writes.map((w) => w.map((x) => x.timeoutMs))).toEqual([[601_000], [300_000]]);
    // Then again only once half of what it was written with is gone: a few writes over its life, not one per answer.
    tick(100_000);
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 199)])).toBeUndefined();
    tick(51_000);
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 148)])).toBeInstanceOf(Promise);
  });

  it('under the floor, the element always outlives the TTL the answer gives, and is renewed within a tenth of the floor', async () => {
    const { filler, writes, answer, tick } = setup([binding('r1', ['a.example'])]);
    await answer('a.example', [a('a.example', '192.0.2.7', 30)]);
    tick(5_000);
    // Wants 60 s from now, holds 55: within the tenth, and beyond the 25 s the answer gives.
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 25)])).toBeUndefined();
    tick(2_000);
    await filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 23)]);
    expect(writes.map((w) => w.map((x) => x.timeoutMs))).toEqual([[60_000], [60_000]]);
  });
  it('over the cap, the element is renewed once it falls a tenth short of the cap, not with every answer', async () => {
    const { filler, writes, answer, tick } = setup([binding('r1', ['a.example'])]);
    await answer('a.example', [a('a.example', '192.0.2.7', 100_000)]);
    tick(100_000);
    expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 99_900)])).toBeUndefined();
    tick(300_000);
    await filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', 99_600)]);
    expect(writes.map((w) => w.map((x) => x.timeoutMs))).toEqual([[3_600_000], [3_600_000]]);
  });

  it('an answer that needs an element another answer is still writing waits for the kernel to take it, and fails with it', async () => {
    let settle: { resolve: () => void; reject: (error: Error) => void } | undefined;
    const { filler, writes } = setup(
      [binding('r1', ['a.example', 'b.example'])],
      {},
      () => new Promise<void>((resolve, reject) => (settle = { resolve, reject })),
    );
    const ask = (name: string) => filler.learn({ name, type: 'A' }, [a(name, '192.0.2.7')]);
    const first = ask('a.example');
    // Another name, the same address, the same rule: the same element, whose write is on its way.
    const second = ask('b.example');
    expect(second).toBeInstanceOf(Promise);
    expect(writes).toHaveLength(1);
    let secondDone = false;
    void second!.then(() => (secondDone = true));
    await new Promise((resolve) => setImmediate(resolve));
    expect(secondDone).toBe(false);
    settle!.resolve();
    await Promise.all([first, second]);
    expect(ask('b.example')).toBeUndefined();

    const { filler: other } = setup(
      [binding('r1', ['a.example', 'b.example'])],
      {},
      () => new Promise<void>((_, reject) => (settle = { resolve: () => {}, reject })),
    );
    const failing = other.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7')]);
    const waiting = other.learn({ name: 'b.example', type: 'A' }, [a('b.example', '192.0.2.7')]);
    settle!.reject(new Error('refused'));
    await expect(failing).rejects.toThrow('refused');
    await expect(waiting).rejects.toThrow('refused');
  });

  it('quietUntil says exactly until when learn answers at once, under the floor, at the TTL and over the cap', async () => {
    for (const ttl of [30, 300, 100_000]) {
      const check = async (late: number) => {
        const { filler, answer, tick } = setup([binding('r1', ['a.example'])]);
        await answer('a.example', [a('a.example', '192.0.2.7', ttl)]);
        const records = [a('a.example', '192.0.2.7', ttl)];
        const until = filler.quietUntil({ name: 'a.example', type: 'A' }, records);
        tick(until - 1_000_000 + late);
        return { until, learned: filler.learn({ name: 'a.example', type: 'A' }, records) };
      };
      const atEnd = await check(0);
      expect(atEnd.until).toBeGreaterThan(1_000_000);
      expect(atEnd.learned, `TTL ${ttl}, at the end`).toBeUndefined();
      expect((await check(1)).learned, `TTL ${ttl}, 1 ms later`).toBeInstanceOf(Promise);
    }
  });

  it('quietUntil holds while a cache entry counts down (any floor, cap, TTL and times): learn does nothing until then', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.integer({ min: 1, max: 120 }),
        fc.integer({ min: 0, max: 300 }),
        fc.integer({ min: 2, max: 600 }),
        fc.integer({ min: 0, max: 999 }),
        // Times within the entry's life, as millionths of it.
        fc.array(fc.integer({ min: 0, max: 1_000_000 }), { minLength: 3, maxLength: 12 }),
        async (ttlFloor, capOver, life, phase, offsets) => {
          const bindings = [binding('r1', ['a.example'])];
          const { filler, tick, view } = setup(bindings);
          filler.update({ ...view, ttlFloor, ttlCap: ttlFloor + capOver });
          // The entry: stored at 1,000,000 with `life` s (and a fraction) to live; its TTL at t is ⌊(expiresAt − t) / 1000⌋.
          const expiresAt = 1_000_000 + life * 1000 + phase;
          let now = 1_000_000;
          const ttlAt = (t: number) => Math.floor((expiresAt - t) / 1000);
          const learnAt = (t: number) => filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', ttlAt(t))]);
          const times = [...offsets]
            .sort((x, y) => x - y)
            .map((o) => 1_000_000 + Math.floor((o * (expiresAt - 1_000_000)) / 1_000_000))
            .filter((t) => ttlAt(t) >= 1);
          if (times.length < 2) return;
          // The first hit writes; the second is where the reply would be kept.
          const [first, keep, ...later] = times as [number, number, ...number[]];
          tick(first - now);
          now = first;
          await learnAt(first);
          tick(keep - now);
          now = keep;
          await learnAt(keep);
          const until = filler.quietUntil({ name: 'a.example', type: 'A' }, [a('a.example', '192.0.2.7', ttlAt(keep))], expiresAt);
          for (const t of later) {
            if (t > until) break;
            tick(t - now);
            now = t;
            expect(learnAt(t), `TTL ${ttlAt(t)} at +${t - keep} ms, quiet until +${until - keep}`).toBeUndefined();
          }
        },
      ),
      { numRuns: 2000 },
    );
  });

  it('a relearn that fails part-way holds nothing it did not write: the next answer writes those elements again', async () => {
    let calls = 0;
    const { filler, view } = setup([binding('r1', ['a.example'])], {}, () => (++calls === 1 ? Promise.reject(new Error('refused')) : Promise.resolve()));
    filler.update({ ...view, liveNames: new Map([['r1_dns4', ['r1_dns4.ffff']]]) });
    // More than one chunk of 4,096: the first fails, the rest are never sent.
    const entries = Array.from({ length: 5000 }, (_, i) => ({ address: `10.0.${i >> 8}.${i & 255}`, chain: ['a.example'], ttl: 300 }));
    await expect(filler.relearn(entries)).rejects.toThrow('refused');
    for (const address of ['10.0.0.0', '10.0.19.135'])
      expect(filler.learn({ name: 'a.example', type: 'A' }, [a('a.example', address, 300)]), address).toBeInstanceOf(Promise);
  });

  it('quietUntil is now while a write is on its way, for an element never written, and under a sparing rule', async () => {
    const records = [a('a.example', '192.0.2.7')];
    const question = { name: 'a.example', type: 'A' };
    const { filler } = setup([binding('r1', ['a.example'])], {}, () => new Promise<void>(() => {}));
    expect(filler.quietUntil(question, records)).toBe(1_000_000);
    void filler.learn(question, records);
    expect(filler.quietUntil(question, records)).toBe(1_000_000);
    const { filler: sparing, answer } = setup([binding('r1', ['a.example'], { sharedAddresses: 'spare' })]);
    await answer('a.example', records);
    expect(sparing.quietUntil(question, records)).toBe(1_000_000);
  });
});
