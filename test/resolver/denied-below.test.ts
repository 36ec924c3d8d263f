/**
 * Names below a denied suffix never reach the upstream: the real resolver
 * with the real decisions (decide.ts) of a policy, forwarding to Debian's
 * dnsmasq, whose query log says what it was asked. A payload in the labels
 * of such a name (DNS tunnelling) would otherwise reach the suffix's
 * nameserver, though the program is answered NXDOMAIN.
 */
import dnsPacket from 'dns-packet';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { buildDecider, type DecideSettings } from '../../src/resolver/decide.js';
import { startResolver, type Resolver } from '../../src/resolver/server.js';
import type { Who } from '../../src/resolver/who.js';
import { FACTS, policyFrom } from '../support/compile-text.js';
import { until } from '../support/wait.js';
import { answerLines, dig, digStatus, frame, rcodeOf, startDnsmasq, tcpExchange, udpQuery, type Dnsmasq } from './dns-support.js';

const POLICY = `
defaults: {egress: allow}
deny:
  - to: ["*.telemetry.test"]
`;
const ASKER: Who = { uid: 65534 };

let upstream: Dnsmasq;
beforeAll(async () => {
  upstream = await startDnsmasq([
    '--local=/test/',
    '--local-ttl=300',
    '--host-record=allowed.example.test,192.0.2.10',
    '--host-record=telemetry.test,192.0.2.66',
    '--host-record=cdn.telemetry.test,192.0.2.66',
    '--cname=alias.example.test,cdn.telemetry.test',
  ]);
});
afterAll(async () => {
  await upstream?.stop();
});

const running: Resolver[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((r) => r.close()));
});

async function resolverFor(settings: DecideSettings): Promise<{ r: Resolver; port: number; learned: string[] }> {
  const policy = policyFrom(POLICY);
  const decide = buildDecider(policy, compile(policy, FACTS, {}).dnsBindings, FACTS, settings);
  const learned: string[] = [];
  const r = await startResolver<Who>({
    listen: ['127.0.0.1'],
    port: 0,
    upstreams: [`127.0.0.1#${upstream.port}`],
    hooks: {
      identify: () => ASKER,
      admit: (who, question) => decide.admit(who, question),
      learn: (question) => void learned.push(question.name),
      shape: (who, question, chain) => decide.shape(who, question, chain),
    },
  });
  running.push(r);
  return { r, port: r.addresses[0]!.port, learned };
}

/** A query for the name of these labels, each as it is, dots included (no encoder writes one with a dot inside a label). */
function rawQuery(labels: readonly string[], id = 7): Buffer {
  const header = Buffer.from([id >> 8, id & 255, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
  const name = labels.flatMap((label) => [Buffer.from([label.length]), Buffer.from(label)]);
  return Buffer.concat([header, ...name, Buffer.from([0, 0, 1, 0, 1])]);
}

/** The names the upstream was asked, once it was asked `last` (asked after the others: its log holds theirs by then). */
async function askedUpstream(last: string): Promise<string[]> {
  const names = () => upstream.queries().map((line) => /\]\s+(\S+)\s+from/.exec(line)?.[1]?.toLowerCase() ?? line);
  await until(`the upstream logged ${last}`, () => names().includes(last));
  return names();
}

describe('a name below a suffix denied by name', () => {
  it('is answered NXDOMAIN without asking upstream, in any spelling, type or transport; the apex, a CNAME to it and an allowed name are asked', async () => {
    const { r, port, learned } = await resolverFor({ deniedAnswer: 'nxdomain' });
    const before = upstream.queries().length;
    expect(digStatus(await dig(port, ['+noall', '+comments', 'A', 'c2VjcmV0.payload.telemetry.test']))).toBe('NXDOMAIN');
    expect(digStatus(await dig(port, ['+noall', '+comments', 'TXT', 'Mixed-Case-PAYLOAD.Telemetry.TEST.']))).toBe('NXDOMAIN');
    expect(digStatus(await dig(port, ['+noall', '+comments', '+tcp', 'AAAA', 'tcp-payload.sub.telemetry.test']))).toBe('NXDOMAIN');
    // A label holding a dot (the name's text then splits otherwise than its labels) is FORMERR, on either side of the suffix.
    expect(rcodeOf(await udpQuery(port, rawQuery(['dot.in.label', 'telemetry', 'test'])))).toBe(1);
    const [split] = await tcpExchange(port, [frame(rawQuery(['payload', 'telemetry.test']))], 1);
    expect(rcodeOf(dnsPacket.decode(split!))).toBe(1);

    // The suffix's apex is spelled out by the policy: asked, and its address learned for the deny set; the program still gets NXDOMAIN.
    expect(digStatus(await dig(port, ['+noall', '+comments', 'A', 'telemetry.test']))).toBe('NXDOMAIN');
    // Denied only through its CNAME chain: known from the answer alone.
    expect(digStatus(await dig(port, ['+noall', '+comments', 'A', 'alias.example.test']))).toBe('NXDOMAIN');
    expect(answerLines(await dig(port, ['+noall', '+answer', 'A', 'allowed.example.test']))).toEqual([['allowed.example.test.', 300, 'A', '192.0.2.10']]);

    const asked = (await askedUpstream('allowed.example.test')).slice(before);
    expect(asked.filter((name) => name.endsWith('telemetry.test'))).toEqual(['telemetry.test']);
    expect(asked).toContain('alias.example.test');
    expect(r.stats()).toMatchObject({ admitNxdomain: 3, formErr: 2, upstreamQueries: 3 });
    expect(learned).toEqual(['telemetry.test', 'alias.example.test', 'allowed.example.test']);
  });

  it('is given the null answer where dns.deniedAnswer is "null" (NXDOMAIN for other types), without asking upstream', async () => {
    const { r, port } = await resolverFor({ deniedAnswer: 'null' });
    const before = upstream.queries().length;
    expect(answerLines(await dig(port, ['+noall', '+answer', 'A', 'null-payload.telemetry.test']))).toEqual([
      ['null-payload.telemetry.test.', 60, 'A', '0.0.0.0'],
    ]);
    expect(answerLines(await dig(port, ['+noall', '+answer', 'AAAA', 'null-payload.telemetry.test']))).toEqual([
      ['null-payload.telemetry.test.', 60, 'AAAA', '::'],
    ]);
    expect(digStatus(await dig(port, ['+noall', '+comments', 'TXT', 'null-payload.telemetry.test']))).toBe('NXDOMAIN');
    await dig(port, ['+noall', '+answer', 'A', 'allowed.example.test']);
    expect((await askedUpstream('allowed.example.test')).slice(before)).toEqual(['allowed.example.test']);
    expect(r.stats()).toMatchObject({ admitNull: 3, upstreamQueries: 1 });
  });

  it('is asked as before where the denied answer is the true answer (dns.deniedAnswer "true")', async () => {
    const { port } = await resolverFor({ deniedAnswer: 'true' });
    const before = upstream.queries().length;
    await dig(port, ['+noall', '+comments', 'A', 'true-payload.telemetry.test']);
    await dig(port, ['+noall', '+answer', 'A', 'allowed.example.test']);
    expect((await askedUpstream('allowed.example.test')).slice(before)).toEqual(['true-payload.telemetry.test', 'allowed.example.test']);
  });
});
