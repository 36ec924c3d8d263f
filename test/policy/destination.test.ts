import { describe, expect, it } from 'vitest';
import { isIPv4, isIPv6 } from 'node:net';
import fc from 'fast-check';
import {
  addressGroups,
  bigIntToAddress,
  addressToBigInt,
  checkDnsName,
  inetAton,
  isPlainDnsName,
  networkContains,
  parseDestination,
  quickGroups,
} from '../../src/policy/destination.js';
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
    ['0x0a.0.0.1', /^"0x0a.0.0.1" is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1$/],
    ['0X0A.0.0.1.', /write 10.0.0.1$/],
    ['012.0.0.1', /^"012.0.0.1" is an IPv4 address in a form .*; write 10.0.0.1$/],
    ['10.1', /write 10.0.0.1$/],
    ['167772161', /write 10.0.0.1$/],
    ['0x7f.1', /write 127.0.0.1$/],
    ['012.0.0.0/8', /write 10.0.0.0\/8$/],
    ['*.0x0a.1', /not a valid wildcard name: it is an IPv4 address .*; write 10.0.0.1$/],
    ['０ｘ０ａ.0.0.1', /write 10.0.0.1$/],
    ['0x100.0.0.1', /last label is a number/],
    ['example.123', /last label is a number/],
    ['ab\u200d.example', /not a valid internationalised \(IDNA\) name/],
  ])('%s is refused', (text, message) => {
    const result = parseDestination(text);
    expect(result.ok).toBe(false);
    if (!result.ok) expect(result.message).toMatch(message);
  });

  it.each([
    ['münchen.example', { kind: 'name', name: 'xn--mnchen-3ya.example' }],
    ['MÜNCHEN.Example.', { kind: 'name', name: 'xn--mnchen-3ya.example' }],
    ['bücher。example', { kind: 'name', name: 'xn--bcher-kva.example' }],
    ['*.münchen.example', { kind: 'suffix', suffix: 'xn--mnchen-3ya.example' }],
    ['xn--mnchen-3ya.example', { kind: 'name', name: 'xn--mnchen-3ya.example' }],
    ['0xdeadbeef.example', { kind: 'name', name: '0xdeadbeef.example' }],
    ['1e100.net', { kind: 'name', name: '1e100.net' }],
  ])('%s is kept in the form resolvers are asked for', (text, expected) => {
    expect(parseDestination(text)).toEqual({ ok: true, value: expected });
  });

  it('quotes at most 80 characters of what it refuses', () => {
    for (const text of [
      'x'.repeat(1_000_000),
      `${'1.'.repeat(100_000)}1`,
      `@${'X'.repeat(100_000)}`,
      `*.${'a'.repeat(100_000)}*`,
      `http://${'a'.repeat(100_000)}`,
    ]) {
      const result = parseDestination(text);
      expect(result.ok).toBe(false);
      if (!result.ok) expect(result.message.length, result.message.slice(0, 40)).toBeLessThan(200);
    }
  });

  it.each([
    ['10.0.0.1', '10.0.0.1'],
    ['0x0a.0.0.1', '10.0.0.1'],
    ['012.0.0.1', '10.0.0.1'],
    ['10.1', '10.0.0.1'],
    ['10.0.1', '10.0.0.1'],
    ['167772161', '10.0.0.1'],
    ['0xA000001', '10.0.0.1'],
    ['0', '0.0.0.0'],
    ['1.0xffffff', '1.255.255.255'],
    ['1.0x1000000', undefined],
    ['256.0.0.1', undefined],
    ['08.0.0.1', undefined],
    ['0x.0.0.1', undefined],
    ['1.2.3.4.5', undefined],
    ['4294967296', undefined],
    ['1.2.3.', undefined],
    ['a.example', undefined],
  ])('inet_aton reads %s as %s', (text, expected) => {
    expect(inetAton(text)).toBe(expected);
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
    expect([...parsed.names]).toEqual(['a.example', 'b.example', 'plain.example']);
    expect([...parsed.suffixes]).toEqual(['wild.example']);
    expect(parsed.rejected).toEqual([]);
  });

  it('keeps IDNs in their ASCII form and refuses address forms and invalid IDNs by line', () => {
    const parsed = parseNameList('münchen.example\n0x0a.0.0.1\n0.0.0.0 bücher.example 10.1\n*.ü.example\nab\u200d.example\n012.0.0.1\n', 'auto');
    expect([...parsed.names]).toEqual(['xn--mnchen-3ya.example', 'xn--bcher-kva.example']);
    expect([...parsed.suffixes]).toEqual(['xn--tda.example']);
    expect(parsed.networks).toEqual([]);
    expect(parsed.rejected).toEqual([
      { line: 2, col: 1, text: '0x0a.0.0.1', reason: 'it is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1' },
      { line: 3, col: 24, text: '10.1', reason: 'it is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1' },
      { line: 5, col: 1, text: 'ab\u200d.example', reason: 'it has characters that are not a valid internationalised (IDNA) name' },
      { line: 6, col: 1, text: '012.0.0.1', reason: '"012.0.0.1" is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1' },
    ]);
  });
});

describe('addresses read in one pass (quickGroups)', () => {
  // The general path it stands in for: node:net decides, then groups by split and parseInt.
  const general = (text: string) => {
    const family = isIPv4(text) ? 4 : isIPv6(text) ? 6 : undefined;
    return family && addressGroups(family, text);
  };

  it('accepts only what node:net accepts, with the same groups, and every plain address it accepts', () => {
    const char = fc.constantFrom(...'0123456789abcdefABCDEF:.'.split(''));
    // Valid addresses, the same with one character changed, inserted or dropped, and random text.
    const mutated = fc.tuple(fc.oneof(fc.ipV4(), fc.ipV6()), fc.nat(), char, fc.constantFrom(0, 1, 2)).map(([text, at, c, how]) => {
      const i = at % (text.length + 1);
      return how === 0 ? text.slice(0, i) + c + text.slice(i + 1) : how === 1 ? text.slice(0, i) + c + text.slice(i) : text.slice(0, i) + text.slice(i + 1);
    });
    const text = fc.oneof(
      fc.ipV4(),
      fc.ipV6(),
      mutated,
      fc.array(char, { maxLength: 40 }).map((chars) => chars.join('')),
    );
    let accepted = 0;
    fc.assert(
      fc.property(text, (t) => {
        const quick = quickGroups(t);
        const expected = general(t);
        if (quick) accepted++;
        if (quick) expect(quick).toEqual(expected);
        // Left to the general path only for IPv6 with an IPv4 tail.
        else if (expected) expect(expected.length === 8 && t.includes('.')).toBe(true);
      }),
      { numRuns: 20_000 },
    );
    expect(accepted).toBeGreaterThan(5_000);
  });

  it('writes IPv6 the RFC 5952 way for any address', () => {
    // The straightforward form: the longest run of two or more zero groups, the first on ties, becomes "::".
    const reference = (groups: number[]) => {
      let best = { start: -1, length: 1 };
      for (let i = 0; i < 8; i++) {
        let j = i;
        while (j < 8 && groups[j] === 0) j++;
        if (j - i > best.length) best = { start: i, length: j - i };
      }
      const hex = groups.map((g) => g.toString(16));
      return best.start < 0 ? hex.join(':') : `${hex.slice(0, best.start).join(':')}::${hex.slice(best.start + best.length).join(':')}`;
    };
    const group = fc.oneof(fc.constant(0), fc.constant(0), fc.integer({ min: 0, max: 0xffff }));
    fc.assert(
      fc.property(fc.array(group, { minLength: 8, maxLength: 8 }), (groups) => {
        expect(
          bigIntToAddress(
            6,
            groups.reduce((acc, g) => (acc << 16n) | BigInt(g), 0n),
          ),
        ).toBe(reference(groups));
      }),
      { numRuns: 5_000 },
    );
  });

  it.each([
    '::',
    '::1',
    '1::',
    '2001:db8::1',
    '2001:DB8:0:0:1:0:0:1',
    '1:2:3:4:5:6:7::',
    '::2:3:4:5:6:7:8',
    '1:2:3:4:5:6:7:8',
    'ffff::ffff:1',
    '0.0.0.0',
    '192.0.2.255',
    '255.255.255.255',
  ])('reads %s', (text) => {
    expect(quickGroups(text)).toEqual(general(text));
  });

  it.each([
    '',
    ':',
    ':::',
    '1:::2',
    '1::2::3',
    '1:2:3:4:5:6:7:8::',
    '::1:2:3:4:5:6:7:8',
    '1:2:3:4:5:6:7',
    '12345::',
    'g::',
    '01.2.3.4',
    '256.1.1.1',
    '1.2.3',
    '1.2.3.4.5',
    '1..2.3',
    '::ffff:192.0.2.1',
    'fe80::1%eth0',
  ])('leaves %s to the general path', (text) => {
    expect(quickGroups(text)).toBeUndefined();
  });
});

describe('DNS names checked in one pass (isPlainDnsName)', () => {
  // checkDnsName's own checks, as they were before the one-pass check went in front of them.
  const LABEL = /^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$/;
  // No DNS name ends in a numeric label: resolvers and URL parsers read such a name as an IPv4 address.
  const NUMERIC = /^(?:[0-9]+|0x[0-9a-f]*)$/;
  const valid = (name: string) =>
    name.length > 0 &&
    name.length <= 253 &&
    name.split('.').every((label) => label.length > 0 && label.length <= 63 && LABEL.test(label)) &&
    !NUMERIC.test(name.split('.').pop()!);

  it('accepts exactly the names the label checks accept', () => {
    const char = fc.constantFrom(...'ab0x_-.Z*'.split(''));
    const label = fc.oneof(
      fc.array(char, { maxLength: 6 }).map((c) => c.join('')),
      fc.constantFrom('a'.repeat(63), 'a'.repeat(64), `a${'-'.repeat(61)}a`),
    );
    const name = fc.oneof(
      fc.array(label, { minLength: 1, maxLength: 5 }).map((labels) => labels.join('.')),
      fc.domain(),
      fc.constant(`${'a'.repeat(63)}.`.repeat(4).slice(0, 254)),
    );
    let accepted = 0;
    fc.assert(
      fc.property(name, (n) => {
        expect(isPlainDnsName(n)).toBe(valid(n));
        expect(checkDnsName(n) === undefined).toBe(valid(n));
        if (valid(n)) accepted++;
      }),
      { numRuns: 20_000 },
    );
    expect(accepted).toBeGreaterThan(2_000);
  });
});
