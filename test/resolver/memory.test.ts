import { describe, expect, it } from 'vitest';
import { AddressMemory, canonicalAddress } from '../../src/resolver/memory.js';

const T0 = 1_800_000_000_000;

describe('AddressMemory', () => {
  it('each name expires on its own: a name learned again later outlives one that was not', () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.remember(['a.example'], '192.0.2.1', 60, T0);
    memory.remember(['b.example'], '192.0.2.1', 300, T0 + 10_000);
    expect(memory.namesOf('192.0.2.1', T0 + 30_000)).toEqual([
      { name: 'b.example', expiresAt: T0 + 310_000 },
      { name: 'a.example', expiresAt: T0 + 60_000 },
    ]);
    // Past a.example's TTL, only b.example: not "the last lookup", and not a name whose answer ran out.
    expect(memory.namesOf('192.0.2.1', T0 + 60_000).map((n) => n.name)).toEqual(['b.example']);
    // A shorter TTL later does not cut a name's expiry short.
    memory.remember(['b.example'], '192.0.2.1', 1, T0 + 61_000);
    expect(memory.namesOf('192.0.2.1', T0 + 100_000)).toEqual([{ name: 'b.example', expiresAt: T0 + 310_000 }]);
    expect(memory.namesOf('192.0.2.1', T0 + 310_000)).toEqual([]);
    expect(memory.counters()).toMatchObject({ entries: 0, names: 0, expired: 1 });
  });

  it('a CNAME chain: every name of it, each with the shortest TTL between it and the address', () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.rememberAnswer('www.shop.example', [
      { name: 'www.shop.example', type: 'CNAME', ttl: 3600, data: 'shop.cdn.example' },
      { name: 'shop.cdn.example', type: 'CNAME', ttl: 120, data: 'edge7.cdn.example' },
      { name: 'edge7.cdn.example', type: 'A', ttl: 20, data: '203.0.113.7' },
      { name: 'edge7.cdn.example', type: 'AAAA', ttl: 600, data: '2001:DB8:0:0::7' },
    ]);
    expect(memory.namesOf('203.0.113.7', T0)).toEqual([
      { name: 'edge7.cdn.example', expiresAt: T0 + 20_000 },
      { name: 'shop.cdn.example', expiresAt: T0 + 20_000 },
      { name: 'www.shop.example', expiresAt: T0 + 20_000 },
    ]);
    // For the AAAA the CNAMEs' own shorter TTLs bound the names above it.
    expect(memory.namesOf('2001:db8::7', T0)).toEqual([
      { name: 'edge7.cdn.example', expiresAt: T0 + 600_000 },
      { name: 'shop.cdn.example', expiresAt: T0 + 120_000 },
      { name: 'www.shop.example', expiresAt: T0 + 120_000 },
    ]);
    expect(memory.sharedWith('2001:db8::7', T0)).toEqual([['www.shop.example', 'shop.cdn.example', 'edge7.cdn.example']]);
    expect(memory.namesOf('2001:db8::7', T0 + 200_000).map((n) => n.name)).toEqual(['edge7.cdn.example']);
  });

  it('a CNAME loop or stray records end the walk, never hang it', () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.rememberAnswer('a.example', [
      { name: 'a.example', type: 'CNAME', ttl: 60, data: 'b.example' },
      { name: 'b.example', type: 'CNAME', ttl: 60, data: 'a.example' },
      { name: 'x.example', type: 'A', ttl: 60, data: '192.0.2.9' },
    ]);
    expect(memory.namesOf('192.0.2.9', T0).map((n) => n.name)).toEqual(['x.example']);
  });

  it('a shared address: two unrelated lookups lead to it, and sharedWith names both chains', () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.rememberAnswer('tracker.example', [
      { name: 'tracker.example', type: 'CNAME', ttl: 300, data: 'cdn.example.net' },
      { name: 'cdn.example.net', type: 'A', ttl: 300, data: '198.51.100.20' },
    ]);
    memory.rememberAnswer('docs.example', [{ name: 'docs.example', type: 'A', ttl: 300, data: '198.51.100.20' }]);
    expect(memory.sharedWith('198.51.100.20', T0)).toEqual([['docs.example'], ['tracker.example', 'cdn.example.net']]);
    // What status lists: only addresses more than one chain leads to, newest first.
    memory.rememberAnswer('alone.example', [{ name: 'alone.example', type: 'A', ttl: 300, data: '198.51.100.21' }]);
    expect(memory.shared(10, T0)).toEqual([{ address: '198.51.100.20', chains: [['docs.example'], ['tracker.example', 'cdn.example.net']] }]);
    expect(memory.shared(0, T0)).toEqual([]);
    expect(
      memory
        .namesOf('198.51.100.20', T0)
        .map((n) => n.name)
        .sort(),
    ).toEqual(['cdn.example.net', 'docs.example', 'tracker.example']);
  });

  it('bounded: past the address cap the least recently learned goes, and is counted', () => {
    const memory = new AddressMemory({ maxAddresses: 3, now: () => T0 });
    for (const last of [1, 2, 3]) memory.remember([`n${last}.example`], `192.0.2.${last}`, 600, T0);
    // Learned again: now the most recent.
    memory.remember(['n1.example'], '192.0.2.1', 600, T0 + 1);
    memory.remember(['n4.example'], '192.0.2.4', 600, T0 + 2);
    expect(memory.namesOf('192.0.2.2', T0 + 3)).toEqual([]);
    expect(memory.namesOf('192.0.2.1', T0 + 3).map((n) => n.name)).toEqual(['n1.example']);
    expect(memory.counters()).toEqual({ entries: 3, names: 3, evictions: 1, expired: 0 });
    for (let i = 0; i < 1000; i++) memory.remember([`m${i}.example`], `10.0.${i >> 8}.${i & 255}`, 600, T0 + 10 + i);
    expect(memory.counters()).toMatchObject({ entries: 3, names: 3, evictions: 1001 });
  });

  it('bounded per address: past the name cap the names soonest to expire go', () => {
    const memory = new AddressMemory({ maxNamesPerAddress: 3, now: () => T0 });
    memory.remember(['long.example'], '192.0.2.1', 3600, T0);
    for (let i = 0; i < 10; i++) memory.remember([`short${i}.example`], '192.0.2.1', 10 + i, T0);
    expect(memory.namesOf('192.0.2.1', T0).map((n) => n.name)).toEqual(['long.example', 'short9.example', 'short8.example']);
    expect(memory.counters()).toMatchObject({ entries: 1, names: 3 });
  });

  it('sweeps addresses whose every name expired as it learns, and on prune', () => {
    let now = T0;
    const memory = new AddressMemory({ now: () => now });
    memory.remember(['old.example'], '192.0.2.1', 1);
    now += 2000;
    memory.remember(['new.example'], '192.0.2.2', 60);
    expect(memory.counters()).toMatchObject({ entries: 1, names: 1, expired: 1 });
    now += 120_000;
    memory.prune();
    expect(memory.counters()).toMatchObject({ entries: 0, names: 0, expired: 2 });
  });

  it('one spelling per address: IPv6 compressed and lower-case, IPv4-mapped as IPv4, names without case or final dot', () => {
    expect(canonicalAddress('2001:0DB8:0000::0001')).toBe('2001:db8::1');
    expect(canonicalAddress('::ffff:192.0.2.5')).toBe('192.0.2.5');
    expect(canonicalAddress('fe80::0001%eth0')).toBe('fe80::1%eth0');
    expect(canonicalAddress('192.0.2.5')).toBe('192.0.2.5');
    const memory = new AddressMemory({ now: () => T0 });
    memory.remember(['WWW.Example.ORG.'], '2001:0db8::0001', 60);
    expect(memory.namesOf('2001:db8::1').map((n) => n.name)).toEqual(['www.example.org']);
  });
});

describe('AddressMemory: who asked for a name', () => {
  const ALICE = 1000;
  const MALLORY = 1001;
  const answer = (name: string, address: string, ttl: number) => [{ name, type: 'A', ttl, data: address }];

  it("a uid's denial is named by a name it looked up itself, not by a longer-lived one another uid pointed at the same address", () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.rememberAnswer('api.alice.example', answer('api.alice.example', '203.0.113.9', 60), T0, ALICE);
    // Mallory's own zone answers with Alice's address, for a day: the latest expiry, so namesOf puts it first.
    memory.rememberAnswer('cdn.mallory.example', answer('cdn.mallory.example', '203.0.113.9', 86_400), T0, MALLORY);
    expect(memory.namesOf('203.0.113.9', T0)[0]!.name).toBe('cdn.mallory.example');
    expect(memory.namesFor('203.0.113.9', ALICE, T0)).toEqual([
      { name: 'api.alice.example', asked: true },
      { name: 'cdn.mallory.example', asked: false },
    ]);
    expect(memory.namesFor('203.0.113.9', MALLORY, T0)[0]).toEqual({ name: 'cdn.mallory.example', asked: true });
    // Once Alice's answer expired, only Mallory's name is left, and it is not hers; nor is any name an orphaned socket's.
    expect(memory.namesFor('203.0.113.9', ALICE, T0 + 60_000)).toEqual([{ name: 'cdn.mallory.example', asked: false }]);
    expect(memory.namesFor('203.0.113.9', undefined, T0)).toEqual([
      { name: 'cdn.mallory.example', asked: false },
      { name: 'api.alice.example', asked: false },
    ]);
    // A name learned without an asker (the filler's learn, before any reply is shaped) is no one's.
    memory.rememberAnswer('plain.example', answer('plain.example', '203.0.113.9', 300), T0);
    expect(memory.namesFor('203.0.113.9', ALICE, T0).find((n) => n.name === 'plain.example')).toEqual({ name: 'plain.example', asked: false });
  });

  it('every name of the chain the uid was answered is its own', () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.rememberAnswer(
      'www.shop.example',
      [
        { name: 'www.shop.example', type: 'CNAME', ttl: 3600, data: 'edge.cdn.example' },
        { name: 'edge.cdn.example', type: 'A', ttl: 20, data: '203.0.113.7' },
      ],
      T0,
      ALICE,
    );
    expect(memory.namesFor('203.0.113.7', ALICE, T0).map((n) => n.asked)).toEqual([true, true]);
  });

  it('bounded: a few uids per name, then only "more"; those first kept stay, and a uid not kept is not taken as one that asked', () => {
    const memory = new AddressMemory({ now: () => T0 });
    const uids = [2000, 2001, 2002, 2003, 2004, 2005];
    for (const uid of uids) memory.rememberAnswer('shared.example', answer('shared.example', '198.51.100.1', 300), T0, uid);
    const asked = (uid: number) => memory.namesFor('198.51.100.1', uid, T0)[0]!.asked;
    expect(uids.map(asked)).toEqual([true, true, true, true, false, false]);
    // Later askers (a user's subordinate uids, say) cannot push out one that asked before them.
    for (let uid = 100_000; uid < 100_050; uid++) memory.rememberAnswer('shared.example', answer('shared.example', '198.51.100.1', 300), T0, uid);
    expect(asked(2000)).toBe(true);
  });

  it('who asked for a name whose answer expired is forgotten when it is learned again', () => {
    const memory = new AddressMemory({ now: () => T0 });
    memory.rememberAnswer('a.example', answer('a.example', '192.0.2.1', 10), T0, ALICE);
    // Another name keeps the address held meanwhile, so a.example's entry is still there, expired.
    memory.rememberAnswer('b.example', answer('b.example', '192.0.2.1', 3600), T0, MALLORY);
    memory.rememberAnswer('a.example', answer('a.example', '192.0.2.1', 3600), T0 + 20_000, MALLORY);
    expect(memory.namesFor('192.0.2.1', ALICE, T0 + 20_000).find((n) => n.name === 'a.example')).toEqual({ name: 'a.example', asked: false });
  });
});
