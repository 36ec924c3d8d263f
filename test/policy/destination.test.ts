import { describe, expect, it } from 'vitest';
import { bigIntToAddress, addressToBigInt, networkContains, parseDestination } from '../../src/policy/destination.js';
import { parseNameList } from '../../src/policy/lists.js';

describe('destinations', () => {
  it.each([
    ['example.org', { kind: 'name', name: 'example.org' }],
    ['Example.ORG.', { kind: 'name', name: 'example.org' }],
    ['*.example.org', { kind: 'suffix', suffix: 'example.org' }],
    ['@tracking', { kind: 'list', list: 'tracking' }],
    ['catalogue:crash-reports', { kind: 'catalogue', selector: 'crash-reports' }],
    ['192.0.2.0/24', { kind: 'net', family: 4, address: '192.0.2.0', prefix: 24 }],
    ['198.51.100.7', { kind: 'net', family: 4, address: '198.51.100.7', prefix: 32 }],
    ['2001:DB8:0:0::/48', { kind: 'net', family: 6, address: '2001:db8::', prefix: 48 }],
  ])('%s parses', (text, expected) => {
    expect(parseDestination(text)).toEqual({ ok: true, value: expected });
  });

  it.each([
    ['https://example.org/x', /neither a DNS name nor an IP/],
    ['ex*mple.org', /wildcard that is not a leading/],
    ['a..b', /empty label/],
    [`${'a'.repeat(64)}.org`, /longer than 63/],
    ['@Bad List', /not a valid list reference/],
    ['catalogue:', /not a valid catalogue reference/],
    ['192.0.2.1/33', /IPv4 allows \/0 to \/32/],
    ['2001:db8::1/64', /host bits/],
    ['', /empty/],
    ['::ffff:192.0.2.1', /IPv4-mapped/],
    ['::ffff:203.0.113.0/120', /IPv4-mapped/],
  ])('%s is refused', (text, message) => {
    const result = parseDestination(text);
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.message).toMatch(message);
  });

  it('prints IPv6 the RFC 5952 way and tests containment', () => {
    expect(bigIntToAddress(6, addressToBigInt(6, '2001:0db8:0000:0000:0001:0000:0000:0001'))).toBe('2001:db8::1:0:0:1');
    expect(bigIntToAddress(6, 0n)).toBe('::');
    expect(networkContains({ family: 6, address: '2001:db8::', prefix: 32 }, 6, '2001:db8:ffff::1')).toBe(true);
    expect(networkContains({ family: 4, address: '192.0.2.0', prefix: 25 }, 4, '192.0.2.200')).toBe(false);
  });
});

describe('name lists', () => {
  it('reads hosts and plain lines, skips self names and comments, keeps suffixes apart', () => {
    const parsed = parseNameList('# c\n127.0.0.1 localhost\n0.0.0.0 a.example b.example\nplain.example # x\n*.wild.example\n::1 ip6-localhost\n', 'auto');
    expect(parsed.names).toEqual(['a.example', 'b.example', 'plain.example']);
    expect(parsed.suffixes).toEqual(['wild.example']);
    expect(parsed.rejected).toEqual([]);
  });
});
