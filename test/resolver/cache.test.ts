import type { Answer } from 'dns-packet';
import { describe, expect, it, vi } from 'vitest';
import { resolverNow } from '../../src/resolver/clock.js';
import { SetFiller } from '../../src/resolver/fill.js';
import { AddressMemory } from '../../src/resolver/memory.js';
import { cacheEntry, cacheKey, cacheTtl, DnsCache, type CacheLimits } from '../../src/resolver/cache.js';

const limits: CacheLimits = { cacheEntries: 3, cacheBytes: 1_000_000, maxTtl: 86_400, maxNegativeTtl: 900 };
const a = (name: string, ttl: number, data = '192.0.2.1'): Answer => ({ type: 'A', name, ttl, data });
/** An answer of 60 s for `name`, stored at time 0. */
const putAnswer = (cache: DnsCache, name: string) =>
  cache.set(cacheKey(name, 'A'), cacheEntry('A', { rcode: 0, answers: [a(name, 60)], authorities: [] }, 50, 0, limits)!);
const cname = (name: string, ttl: number, data: string): Answer => ({ type: 'CNAME', name, ttl, data });
const soa = (ttl: number, minimum: number): Answer => ({
  type: 'SOA',
  name: 'example.test',
  ttl,
  data: { mname: 'ns.example.test', rname: 'h.example.test', serial: 1, refresh: 1, retry: 1, expire: 1, minimum },
});

describe('cache TTLs', () => {
  it('keeps an answer for the smallest TTL of its records, capped', () => {
    expect(cacheTtl('A', 0, [cname('www.x', 600, 'x'), a('x', 60)], [], limits)).toBe(60);
    expect(cacheTtl('A', 0, [a('x', 10 ** 6)], [], limits)).toBe(86_400);
    expect(cacheTtl('A', 0, [a('x', 0)], [], limits)).toBeUndefined();
  });

  it('keeps a negative answer for min(SOA TTL, SOA MINIMUM), capped, and not at all without a SOA (RFC 2308)', () => {
    expect(cacheTtl('A', 3, [], [soa(300, 30)], limits)).toBe(30);
    expect(cacheTtl('A', 3, [], [soa(20, 3600)], limits)).toBe(20);
    expect(cacheTtl('A', 0, [], [soa(7200, 7200)], limits)).toBe(900);
    expect(cacheTtl('A', 3, [], [], limits)).toBeUndefined();
    // A CNAME to a name without data of the type: negative, and the CNAME's TTL bounds it too.
    expect(cacheTtl('A', 0, [cname('www.x', 10, 'x')], [soa(300, 300)], limits)).toBe(10);
    // …but asking for the CNAME itself, that is the answer.
    expect(cacheTtl('CNAME', 0, [cname('www.x', 10, 'x')], [], limits)).toBe(10);
  });

  it('never keeps SERVFAIL, REFUSED or anything but NOERROR and NXDOMAIN', () => {
    for (const rcode of [1, 2, 4, 5]) expect(cacheTtl('A', rcode, [a('x', 300)], [soa(300, 300)], limits)).toBeUndefined();
  });
});

describe('DnsCache', () => {
  it('hands out the TTL that remains, whole seconds rounded down, and forgets the entry when less than a second is left', () => {
    let now = 1_000_000;
    const cache = new DnsCache(limits, () => now);
    const key = cacheKey('x', 'A');
    cache.set(key, cacheEntry('A', { rcode: 0, answers: [a('x', 60), a('x', 90, '192.0.2.2')], authorities: [] }, 100, now, limits)!);
    expect(cache.get(key)?.answers.map((r) => ('ttl' in r ? r.ttl : undefined))).toEqual([60, 60]);
    now += 1500;
    expect(cache.get(key)?.answers.map((r) => ('ttl' in r ? r.ttl : undefined))).toEqual([58, 58]);
    now += 58_000;
    expect(cache.get(key)).toBeUndefined();
    expect(cache.stats()).toMatchObject({ hits: 2, misses: 1, expired: 1, entries: 0, bytes: 0 });
  });

  it('evicts the least recently used entry past its entry cap', () => {
    const cache = new DnsCache(limits, () => 0);
    const put = (name: string) => putAnswer(cache, name);
    put('a');
    put('b');
    put('c');
    expect(cache.get(cacheKey('a', 'A'))).toBeDefined();
    put('d');
    expect(cache.get(cacheKey('b', 'A'))).toBeUndefined();
    expect(cache.get(cacheKey('a', 'A'))).toBeDefined();
    expect(cache.get(cacheKey('c', 'A'))).toBeDefined();
    expect(cache.get(cacheKey('d', 'A'))).toBeDefined();
    expect(cache.stats()).toMatchObject({ entries: 3, evictions: 1 });
  });

  it('gives a hit entry one second chance, not a place for ever', () => {
    const cache = new DnsCache(limits, () => 0);
    const put = (name: string) => putAnswer(cache, name);
    // Read without get(), whose hit would mark what this test watches.
    const stored = (cache as unknown as { entries: Map<string, unknown> }).entries;
    const held = () => ['a', 'b', 'c', 'd', 'e', 'f', 'g'].filter((name) => stored.has(cacheKey(name, 'A')));
    put('a');
    put('b');
    put('c');
    expect(cache.get(cacheKey('a', 'A'))).toBeDefined();
    put('d');
    expect(held()).toEqual(['a', 'c', 'd']);
    put('e');
    expect(held()).toEqual(['a', 'd', 'e']);
    // Passed over once when b went, and not used since: a goes now, before d, which was stored after it.
    put('f');
    expect(held()).toEqual(['d', 'e', 'f']);
    put('g');
    expect(held()).toEqual(['e', 'f', 'g']);
    expect(cache.stats()).toMatchObject({ entries: 3, evictions: 4 });
  });

  it('stores a new entry even when every entry before it was hit: the oldest of them goes', () => {
    const cache = new DnsCache(limits, () => 0);
    const put = (name: string) => putAnswer(cache, name);
    put('a');
    put('b');
    put('c');
    for (const name of ['a', 'b', 'c']) expect(cache.get(cacheKey(name, 'A'))).toBeDefined();
    put('d');
    expect(cache.get(cacheKey('d', 'A'))).toBeDefined();
    expect(cache.get(cacheKey('a', 'A'))).toBeUndefined();
    expect(cache.stats()).toMatchObject({ entries: 3, evictions: 1 });
  });

  it('reuse: the entry a hold keeps while it is stored and has a second left, counted as a hit; none once replaced, evicted, expired or cleared', () => {
    const now = 0;
    const cache = new DnsCache({ ...limits, cacheEntries: 2 }, () => now);
    const entry = (name: string, ttl = 60) => cacheEntry('A', { rcode: 0, answers: [a(name, ttl)], authorities: [] }, 50, now, limits)!;
    const holdOf = (name: string) => cache.get(cacheKey(name, 'A'))!.hold!;
    const first = entry('x');
    cache.set(cacheKey('x', 'A'), first);
    const hold = holdOf('x');
    expect(cache.stats().hits).toBe(1);
    expect(cache.reuse(hold, now)).toBe(first);
    expect(cache.stats().hits).toBe(2);
    // Replaced: the hold keeps nothing (and does not keep the old entry alive).
    cache.set(cacheKey('x', 'A'), entry('x'));
    expect(hold.entry).toBeUndefined();
    expect(cache.reuse(hold, now)).toBeUndefined();
    expect(cache.stats().hits).toBe(2);
    // Less than a second left: what get would not give either.
    const short = holdOf('x');
    expect(cache.reuse(short, 59_001)).toBeUndefined();
    expect(cache.reuse(short, 59_000)).toBeDefined();
    // Evicted (the cache holds two; x was hit, so y goes first, then x once its second chance is spent).
    cache.set(cacheKey('y', 'A'), entry('y'));
    const y = holdOf('y');
    cache.set(cacheKey('z', 'A'), entry('z'));
    cache.set(cacheKey('w', 'A'), entry('w'));
    expect([short.entry, y.entry]).toEqual([undefined, undefined]);
    const w = holdOf('w');
    cache.clear();
    expect(cache.reuse(w, now)).toBeUndefined();
  });

  it('evicts past its byte cap, and does not take an entry larger than the whole cache', () => {
    const small: CacheLimits = { ...limits, cacheEntries: 1000, cacheBytes: 2000 };
    const cache = new DnsCache(small, () => 0);
    for (let i = 0; i < 10; i++) cache.set(cacheKey(`n${i}`, 'A'), cacheEntry('A', { rcode: 0, answers: [a(`n${i}`, 60)], authorities: [] }, 300, 0, small)!);
    expect(cache.stats().bytes).toBeLessThanOrEqual(2000);
    expect(cache.stats().entries).toBe(3);
    expect(cache.stats().evictions).toBe(7);
    cache.set(cacheKey('huge', 'TXT'), cacheEntry('TXT', { rcode: 0, answers: [a('huge', 60)], authorities: [] }, 5000, 0, small)!);
    expect(cache.get(cacheKey('huge', 'TXT'))).toBeUndefined();
    expect(cache.stats().entries).toBe(3);
  });

  it('keeps only the SOA of a negative answer, and nothing of the authority section of a positive one', () => {
    const ns: Answer = { type: 'NS', name: 'example.test', ttl: 300, data: 'ns.example.test' };
    const negative = cacheEntry('A', { rcode: 3, answers: [], authorities: [ns, soa(60, 60)] }, 100, 0, limits)!;
    expect(negative.authorities.map((r) => r.type)).toEqual(['SOA']);
    const positive = cacheEntry('A', { rcode: 0, answers: [a('x', 60)], authorities: [ns] }, 100, 0, limits)!;
    expect(positive.authorities).toEqual([]);
  });
});

describe('the clock the resolver holds things by', () => {
  /** Date.now and performance.now as the test moves them, installed before anything reads them. */
  function clocks() {
    let wall = Date.now();
    let steady = performance.now();
    const spies = [vi.spyOn(Date, 'now').mockImplementation(() => wall), vi.spyOn(performance, 'now').mockImplementation(() => steady)];
    return {
      /** Time passes, on both. */
      pass: (ms: number) => ((wall += ms), (steady += ms)),
      /** The wall clock set (NTP, `date`); a suspend moves it too, while the steady clock stands. */
      setWall: (ms: number) => (wall += ms),
      restore: () => spies.forEach((spy) => spy.mockRestore()),
    };
  }

  it('never goes back when the wall clock is set back, and takes up a suspend the steady clock slept through', () => {
    const c = clocks();
    try {
      const start = resolverNow();
      c.setWall(-3_600_000);
      c.pass(1000);
      expect(resolverNow() - start).toBeCloseTo(1000, 0);
      c.setWall(8 * 3_600_000);
      expect(resolverNow() - start).toBeCloseTo(1000 + 8 * 3_600_000, 0);
    } finally {
      c.restore();
    }
  });

  it('a cached answer ends with its TTL though the wall clock was set back, and after a suspend', () => {
    const c = clocks();
    try {
      const put = () => {
        const cache = new DnsCache(limits);
        cache.set(cacheKey('x', 'A'), cacheEntry('A', { rcode: 0, answers: [a('x', 3600)], authorities: [] }, 50, resolverNow(), limits)!);
        return cache;
      };
      const setBack = put();
      c.setWall(-7_200_000);
      c.pass(3_601_000);
      expect(setBack.get(cacheKey('x', 'A'))).toBeUndefined();
      const slept = put();
      c.setWall(3_601_000);
      expect(slept.get(cacheKey('x', 'A'))).toBeUndefined();
    } finally {
      c.restore();
    }
  });

  it('the address memory forgets a name with its TTL though the wall clock was set back (a relearn puts back only what is alive)', () => {
    const c = clocks();
    try {
      const memory = new AddressMemory();
      memory.rememberAnswer('x', [{ name: 'x', type: 'A', ttl: 60, data: '192.0.2.1' }]);
      expect(memory.namesOf('192.0.2.1').map((n) => n.name)).toEqual(['x']);
      c.setWall(-3_600_000);
      c.pass(61_000);
      expect(memory.namesOf('192.0.2.1')).toEqual([]);
    } finally {
      c.restore();
    }
  });

  it('the filler writes an element again once half its time has passed, though the wall clock was set back', async () => {
    const c = clocks();
    try {
      const bindings = [{ ruleId: 'r1', verdict: 'deny' as const, names: ['x'], suffixes: [], lists: [], set4: 'r1_dns4', set6: 'r1_dns6' }];
      const filler = new SetFiller(
        { bindings, bindingsFor: () => [0], liveNames: new Map([['r1_dns4', ['r1_dns4.1']]]), ttlFloor: 60, ttlCap: 86_400 },
        { add: () => Promise.resolve(), remove: () => Promise.resolve() },
        undefined,
      );
      const answer = (ttl: number) => filler.learn({ name: 'x', type: 'A' }, [{ name: 'x', type: 'A', ttl, data: '192.0.2.1' }]);
      await answer(3600);
      c.setWall(-7_200_000);
      c.pass(1_801_000);
      expect(answer(1799)).toBeInstanceOf(Promise);
    } finally {
      c.restore();
    }
  });
});
