import dnsPacket from 'dns-packet';
import { describe, expect, it } from 'vitest';
import { ErrorCode } from '../../src/errors.js';
import { cnameChain, encodeReply, isRejection, parseQuery, Rcode, type Query } from '../../src/resolver/message.js';
import { parseUpstream } from '../../src/resolver/upstream.js';

const opt = (udpPayloadSize = 1232, ednsVersion = 0) => ({
  type: 'OPT' as const,
  name: '.',
  udpPayloadSize,
  extendedRcode: 0,
  ednsVersion,
  flags: 0,
  flag_do: false,
  options: [],
});
const parsed = (raw: Buffer) => {
  const result = parseQuery(raw);
  if (isRejection(result)) throw new Error(`rejected: ${JSON.stringify(result)}`);
  return result;
};
const rejection = (raw: Buffer) => {
  const result = parseQuery(raw);
  if (!isRejection(result)) throw new Error('accepted');
  return result;
};

describe('parseQuery', () => {
  it('reads one question, lower-cased without the trailing dot, and the client EDNS size within 512..4096', () => {
    const q = parsed(dnsPacket.encode({ type: 'query', id: 7, questions: [{ type: 'AAAA', name: 'WWW.Example.Org.' }], additionals: [opt(65535)] }));
    expect(q).toMatchObject({ id: 7, name: 'www.example.org', type: 'AAAA', edns: { udpPayloadSize: 4096, version: 0 } });
    expect(parsed(dnsPacket.encode({ type: 'query', id: 7, questions: [{ type: 'A', name: 'x' }], additionals: [opt(100)] })).edns?.udpPayloadSize).toBe(512);
  });

  it('answers FORMERR or NOTIMP to what is not one plain question, NXDOMAIN never', () => {
    const cases: [Buffer, number][] = [
      [dnsPacket.encode({ type: 'query', id: 1, questions: [] }), Rcode.FormErr],
      [
        dnsPacket.encode({
          type: 'query',
          id: 1,
          questions: [
            { type: 'A', name: 'a' },
            { type: 'A', name: 'b' },
          ],
        }),
        Rcode.FormErr,
      ],
      [
        dnsPacket.encode({ type: 'query', id: 1, questions: [{ type: 'A', name: 'a' }], answers: [{ type: 'A', name: 'a', data: '192.0.2.1' }] }),
        Rcode.FormErr,
      ],
      [dnsPacket.encode({ type: 'query', id: 1, questions: [{ type: 'A', name: 'a' }], additionals: [opt(), opt()] }), Rcode.FormErr],
      [dnsPacket.encode({ type: 'query', id: 1, questions: [{ type: 'OPT', name: 'a' }] }), Rcode.FormErr],
      [dnsPacket.encode({ type: 'query', id: 1, questions: [{ type: 'AXFR', name: 'example.org' }] }), Rcode.NotImp],
      [dnsPacket.encode({ type: 'query', id: 1, questions: [{ type: 'A', name: 'a', class: 'CH' }] }), Rcode.NotImp],
      [dnsPacket.encode({ type: 'query', id: 1, flags: 5 << 11, questions: [{ type: 'A', name: 'a' }] }), Rcode.NotImp],
    ];
    for (const [raw, rcode] of cases) {
      const r = rejection(raw);
      expect('rcode' in r && r.rcode).toBe(rcode);
      const reply = dnsPacket.decode('reply' in r ? r.reply : Buffer.alloc(0));
      expect(reply.id).toBe(1);
      expect((reply.flags ?? 0) & 0xf).toBe(rcode);
    }
  });

  it('refuses a name that would be asked upstream as another name (a dot inside a label, bytes that are not UTF-8)', () => {
    // One label "a.b", then "c": decoded as "a.b.c", which is three labels.
    const dotted = Buffer.from([0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, 0x61, 0x2e, 0x62, 1, 0x63, 0, 0, 1, 0, 1]);
    expect(rejection(dotted)).toMatchObject({ rcode: Rcode.FormErr });
    const latin1 = Buffer.from([0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0xe9, 0x65, 0, 0, 1, 0, 1]);
    expect(rejection(latin1)).toMatchObject({ rcode: Rcode.FormErr });
  });

  it('drops what has no header, and responses', () => {
    expect(parseQuery(Buffer.alloc(11))).toHaveProperty('drop');
    expect(parseQuery(dnsPacket.encode({ type: 'response', id: 1, questions: [{ type: 'A', name: 'a' }] }))).toHaveProperty('drop');
  });
});

describe('encodeReply', () => {
  const query: Query = {
    id: 77,
    flags: 0x0110,
    question: { type: 'TXT', name: 'Big.Example', class: 'IN' },
    name: 'big.example',
    type: 'TXT',
    edns: undefined,
  };
  const answers = [{ type: 'TXT' as const, name: 'big.example', ttl: 5, data: ['x'.repeat(250), 'y'.repeat(250), 'z'.repeat(250)] }];

  it('echoes id, RD and CD, and the question as written; owner names take its spelling', () => {
    const reply = dnsPacket.decode(encodeReply(query, { rcode: 0, answers }).bytes);
    expect(reply).toMatchObject({ id: 77, flag_qr: true, flag_rd: true, flag_cd: true, flag_ra: true, flag_aa: false });
    expect(reply.questions).toEqual([{ type: 'TXT', name: 'Big.Example', class: 'IN' }]);
    expect(reply.answers?.[0]?.name).toBe('Big.Example');
  });

  it('cuts to the header and question with TC=1 when over the limit', () => {
    const { bytes, truncated } = encodeReply(query, { rcode: 0, answers }, 512);
    expect(truncated).toBe(true);
    const reply = dnsPacket.decode(bytes);
    expect(reply.flag_tc).toBe(true);
    expect(reply.answers).toEqual([]);
    expect(reply.questions).toHaveLength(1);
  });

  it('answers BADVERS through the OPT record', () => {
    const reply = dnsPacket.decode(encodeReply({ ...query, edns: { udpPayloadSize: 1232, version: 1 } }, { rcode: Rcode.BadVers }).bytes);
    expect((reply.flags ?? 0) & 0xf).toBe(0);
    expect(reply.additionals).toMatchObject([{ type: 'OPT', extendedRcode: 1, udpPayloadSize: 1232 }]);
  });
});

describe('cnameChain', () => {
  it('follows the chain from the question name, stopping at a loop', () => {
    const rec = (name: string, data: string) => ({ name, type: 'CNAME', ttl: 1, data });
    expect(cnameChain('a', [rec('b', 'c'), rec('a', 'b'), { name: 'c', type: 'A', ttl: 1, data: '192.0.2.1' }])).toEqual(['a', 'b', 'c']);
    expect(cnameChain('a', [rec('a', 'b'), rec('b', 'a')])).toEqual(['a', 'b']);
    expect(cnameChain('a', [rec('x', 'y')])).toEqual(['a']);
  });
});

describe('parseUpstream', () => {
  it('reads ADDR and ADDR#PORT, IPv6 canonical', () => {
    expect(parseUpstream('192.0.2.53')).toEqual({ address: '192.0.2.53', port: 53, family: 4 });
    expect(parseUpstream('2001:DB8:0::1#5353')).toEqual({ address: '2001:db8::1', port: 5353, family: 6 });
  });

  it('refuses names, bad ports, and empty text with EGD_RESOLVER_START (upstream)', () => {
    for (const text of ['dns.example', '192.0.2.1#0', '192.0.2.1#70000', '', '192.0.2.1:53', 'fe80::1%eth0'])
      expect(() => parseUpstream(text)).toThrow(expect.objectContaining({ code: ErrorCode.ResolverStart, reason: 'upstream' }));
  });
});
