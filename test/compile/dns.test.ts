import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { compile, type Compiled } from '../../src/compile/compile.js';
import { explain, type ExplainQuery } from '../../src/compile/explain.js';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import { renderText, type RuleDecl } from '../../src/compile/ruleset.js';
import { loadPolicyOrThrow } from '../../src/policy/load.js';
import { compileYaml, FACTS, policyFrom } from '../support/compile-text.js';
import { packetFor } from '../support/connection.js';
import { evaluate, type Packet } from '../support/ruleset-interpreter.js';

const MARK = 0x45444e53;

/** A new connection from alice (uid 1000) to an internet address, udp 53. */
const packet = (over: Partial<Packet> = {}): Packet => ({
  oif: 'eth0',
  family: 4,
  daddr: '198.51.100.53',
  l4proto: 'udp',
  dport: 53,
  skuid: 1000,
  skgid: 1000,
  cgroup: '',
  ct: 'new',
  ...over,
});

function ruleText(r: RuleDecl): string {
  const text = renderText({ table: { family: 'inet', name: 't' }, sets: [], chains: [{ name: 'c', rules: [r] }] });
  return /\t\t(.*)\n/.exec(text)![1]!.replace(/ #[0-9a-f]{8}"$/, '"');
}

function shortId(compiled: Compiled, ruleId: string): string {
  return compiled.ruleIds.find((e) => e.ruleId === ruleId)!.id;
}

/** What the table does with the packet, and what explain says for the same connection, decided where. */
function both(yaml: string, over: Partial<Packet>, options: { lockdown?: boolean } = {}) {
  const policy = policyFrom(yaml);
  const compiled = compileYaml(yaml, options);
  const p = packet(over);
  const query: ExplainQuery = {
    who: { kind: 'user', user: p.skuid ?? 65534 },
    host: p.daddr,
    ...(p.dport !== undefined ? { port: p.dport } : {}),
    proto: p.l4proto === 'tcp' ? 'tcp' : p.l4proto === 'udp' ? 'udp' : 'icmp',
    ...(p.mark !== undefined ? { mark: p.mark } : {}),
  };
  const answer = explain(policy, query, FACTS, options);
  if ('error' in answer) throw new Error(answer.error);
  const kernel = evaluate(compiled.ruleset, p);
  return { kernel: `${kernel.verdict} ${kernel.chain}`, explain: `${answer.verdict} ${answer.level} ${answer.ruleId}` };
}

const ALLOW_ALL = 'defaults: {egress: allow}\napps:\n  everything: {identity: {user: alice}, default: allow, rules: [{allow: any}]}\n';
const DENY_ALL = 'defaults: {egress: deny}\ndeny:\n  - to: [198.51.100.53, "2001:db8::53"]\n';

describe('dns.exclusive: only the resolver sends DNS off the host', () => {
  it('one rule in front of every packet past Tor: protocol and port looked up in constant sets, then the resolver’s mark or a logged drop', () => {
    const compiled = compileYaml(`${ALLOW_ALL}tor: {enabled: true, updaters: [{user: _apt}]}\n`);
    const output = compiled.ruleset.chains.find((c) => c.name === 'output')!.rules.map(ruleText);
    const at = output.findIndex((text) => text.includes('goto dns_egress'));
    expect(output[at]).toBe(
      `meta l4proto @proto_tcp_udp th dport @ports_53_853 goto dns_egress comment "${shortId(compiled, 'dns/exclusive')} dns/exclusive: DNS, DNS-over-TLS and DNS-over-QUIC"`,
    );
    // Right after Tor's own traffic, right before the apps.
    expect(output[at - 1]).toContain('tor/own');
    expect(output[at + 1]).toMatch(/^meta skuid vmap @app_uid/);
    const sets = new Map(compiled.ruleset.sets.map((s) => [s.name, s]));
    expect(sets.get('proto_tcp_udp')).toMatchObject({ elements: ['tcp', 'udp'], flags: [] });
    expect(sets.get('ports_53_853')).toMatchObject({ elements: [53, 853], flags: [] });
    const chain = compiled.ruleset.chains.find((c) => c.name === 'dns_egress')!.rules.map(ruleText);
    const drop = shortId(compiled, 'dns/exclusive');
    expect(chain).toEqual([
      `meta mark 0x45444e53 meta skuid 0 counter accept comment "${shortId(compiled, 'dns/resolver')} dns/resolver: the resolver's own queries"`,
      `update @lograte_${drop} { meta skuid limit rate 10/second burst 20 packets } log prefix "egd ${drop} " group 7745 counter drop comment "${drop} dns/exclusive"`,
      `meta skuid 0-4294967295 counter drop comment "${drop} dns/exclusive"`,
      `limit rate 10/second burst 20 packets log prefix "egd ${drop} " group 7745 comment "${drop} dns/exclusive"`,
      `counter drop comment "${drop} dns/exclusive"`,
    ]);
    expect(parseLogPrefix(`egd ${drop} `)).toBe(drop);
  });

  it('drops and logs DNS, DNS-over-TLS and DNS-over-QUIC of an app that allows everything, and under a default allow', () => {
    for (const [l4proto, dport] of [
      ['udp', 53],
      ['tcp', 53],
      ['tcp', 853],
      ['udp', 853],
    ] as const) {
      expect(both(ALLOW_ALL, { l4proto, dport })).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
      expect(both(ALLOW_ALL, { l4proto, dport, family: 6, daddr: '2001:db8::53' })).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
      // Nobody's app: the global default allows, and the DNS rule holds first.
      expect(both(ALLOW_ALL, { l4proto, dport, skuid: 4321 })).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
      // A mark that is not the resolver's is nobody's.
      expect(both(ALLOW_ALL, { l4proto, dport, mark: 7 })).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
      // Nor is the resolver's mark on a socket that is not root's: CAP_NET_RAW alone sets any mark (Linux 5.17), and mtr-packet has it.
      expect(both(ALLOW_ALL, { l4proto, dport, mark: MARK, skuid: 4321 })).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
      // Nor on a packet without an owner: a SYN-ACK sent with SYN cookies carries its listener's mark and no owner, and what a
      // closed socket sends keeps its mark. The resolver closes its TCP queries so that it sends nothing without an owner.
      const { skuid: _owner, ...ownerless } = packet({ l4proto, dport, mark: MARK, ct: 'established' });
      expect(evaluate(compileYaml(ALLOW_ALL).ruleset, ownerless)).toMatchObject({ verdict: 'drop', chain: 'dns_egress' });
    }
    // Other ports and protocols are the app's to decide.
    expect(both(ALLOW_ALL, { dport: 5353 })).toEqual({ kernel: 'accept app_everything', explain: 'allow app app/everything/0' });
    expect(both(ALLOW_ALL, { l4proto: 'tcp', dport: 443 })).toEqual({ kernel: 'accept app_everything', explain: 'allow app app/everything/0' });
    const { dport: _, ...icmp } = packet({ l4proto: 'icmp' });
    expect(evaluate(compileYaml(ALLOW_ALL).ruleset, icmp)).toMatchObject({ verdict: 'accept', chain: 'app_everything' });
  });

  it("lets the resolver's marked packets out under a default deny and a deny of the server's address", () => {
    for (const [l4proto, dport] of [
      ['udp', 53],
      ['tcp', 853],
    ] as const) {
      expect(both(DENY_ALL, { l4proto, dport, mark: MARK, skuid: 0, skgid: 0 })).toEqual({ kernel: 'accept dns_egress', explain: 'allow dns dns/resolver' });
      expect(both(DENY_ALL, { l4proto, dport, mark: MARK, skuid: 0, skgid: 0, family: 6, daddr: '2001:db8::53' })).toEqual({
        kernel: 'accept dns_egress',
        explain: 'allow dns dns/resolver',
      });
    }
    // The mark lets out DNS only: the same socket to another port meets the deny.
    expect(both(DENY_ALL, { l4proto: 'tcp', dport: 443, mark: MARK, skuid: 0 })).toEqual({ kernel: 'drop log_g0', explain: 'deny global-deny deny/f.yaml/0' });
    // And with dns.exclusive off too, in a rule that tests the mark first.
    const open = `${DENY_ALL}dns: {exclusive: false}\n`;
    expect(both(open, { mark: MARK, skuid: 0 })).toEqual({ kernel: 'accept output', explain: 'allow dns dns/resolver' });
    expect(both(open, {})).toEqual({ kernel: 'drop log_g0', explain: 'deny global-deny deny/f.yaml/0' });
    const rules = compileYaml(open)
      .ruleset.chains.find((c) => c.name === 'output')!
      .rules.map(ruleText);
    expect(rules.filter((text) => text.includes('dns/'))).toEqual([
      `meta mark 0x45444e53 meta skuid 0 meta l4proto @proto_tcp_udp th dport @ports_53_853 counter accept comment "${shortId(compileYaml(open), 'dns/resolver')} dns/resolver: the resolver's own queries"`,
    ]);
    expect(compileYaml(open).ruleset.chains.map((c) => c.name)).not.toContain('dns_egress');
  });

  it("follows the policy's mark", () => {
    const yaml = `${DENY_ALL}dns: {mark: 0x2a}\n`;
    expect(both(yaml, { mark: 0x2a, skuid: 0 })).toEqual({ kernel: 'accept dns_egress', explain: 'allow dns dns/resolver' });
    expect(both(yaml, { mark: MARK, skuid: 0 })).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
  });

  it('leaves loopback, system domains, lockdown and Tor where they were', () => {
    // Clients reach the resolver over loopback.
    expect(both(ALLOW_ALL, { oif: 'lo', daddr: '127.0.0.153' })).toEqual({ kernel: 'accept output', explain: 'allow loopback loopback' });
    // A system domain's member has no network, its DNS included, marked or not.
    const domain = `${ALLOW_ALL}systemDomains: {off: {members: [{user: vault}]}}\n`;
    expect(both(domain, { skuid: 990, mark: MARK })).toEqual({ kernel: 'drop sd_off', explain: 'deny system-domain sd/off' });
    // The kill switch stops the resolver's upstream queries too; Tor's own traffic still leaves, to any port.
    const tor = `${ALLOW_ALL}tor: {enabled: true, updaters: [{user: _apt}]}\n`;
    expect(both(tor, { skuid: 0, mark: MARK }, { lockdown: true })).toEqual({ kernel: 'drop lockdown', explain: 'deny lockdown lockdown' });
    expect(both(tor, {}, { lockdown: true })).toEqual({ kernel: 'drop lockdown', explain: 'deny lockdown lockdown' });
    expect(both(tor, { skuid: 110 }, { lockdown: true })).toEqual({ kernel: 'accept output', explain: 'allow lockdown lockdown' });
    expect(both(tor, { skuid: 110, l4proto: 'tcp', dport: 853 })).toEqual({ kernel: 'accept output', explain: 'allow tor tor/own' });
    // Updaters reach only the SOCKS port: their DNS is Tor confinement's to drop.
    expect(both(tor, { skuid: 42 })).toEqual({ kernel: 'drop tor_updaters', explain: 'deny tor tor/updaters' });
  });

  it('explain says so for port 53 and 853 and names the rule; without a port it notes the rule', () => {
    const policy = policyFrom(ALLOW_ALL);
    const denied = explain(policy, { who: { kind: 'user', user: 'alice' }, host: 'dns.example', port: 853, proto: 'tcp' }, FACTS);
    expect(denied).toMatchObject({ verdict: 'deny', level: 'dns', ruleId: 'dns/exclusive', at: undefined });
    const portless = explain(policy, { who: { kind: 'user', user: 'alice' }, host: '198.51.100.53' }, FACTS);
    expect(portless).toMatchObject({ verdict: 'allow', level: 'app' });
    if ('error' in portless) throw new Error(portless.error);
    expect(portless.notes).toContain("dns/exclusive (deny) applies to udp and tcp ports 53 and 853: only the resolver's own packets leave to them");
  });
});

describe('the shipped DoH list (policies/15-dns-bypass.yaml)', () => {
  const { policy } = loadPolicyOrThrow(join(import.meta.dirname, '..', '..', 'policies'));
  const { ruleset } = compile(policy, FACTS);
  const ask = (who: ExplainQuery['who'], host: string, port: number, proto: 'tcp' | 'udp', mark?: number) => {
    const answer = explain(policy, { who, host, port, proto, ...(mark === undefined ? {} : { mark }) }, FACTS);
    if ('error' in answer) throw new Error(answer.error);
    const kernel = evaluate(ruleset, packetFor({ who, address: host, port, proto, ...(mark === undefined ? {} : { mark }) }));
    return { kernel: `${kernel.verdict} ${kernel.chain}`, explain: `${answer.verdict} ${answer.level} ${answer.ruleId}` };
  };
  const root = { kind: 'user', user: 0 } as const;

  it('denies public DoH endpoints by address and by name, for everyone', () => {
    const doh = 'deny global-deny deny/15-dns-bypass.yaml/0';
    for (const host of ['1.1.1.1', '8.8.8.8', '9.9.9.9', '2606:4700:4700::1111', '2620:fe::fe'])
      expect(ask(root, host, 443, 'tcp')).toEqual({ kernel: 'drop log_g2', explain: doh });
    for (const name of ['dns.google', 'cloudflare-dns.com', 'dns.quad9.net', 'mozilla.cloudflare-dns.com']) {
      expect(explain(policy, { who: root, host: name, port: 443, proto: 'tcp' }, FACTS)).toMatchObject({
        verdict: 'deny',
        ruleId: 'deny/15-dns-bypass.yaml/0',
      });
    }
    expect(policy.globalDeny.find((r) => r.id === 'deny/15-dns-bypass.yaml/0')).toMatchObject({ sharedAddresses: 'spare' });
    // A DoH name behind Cloudflare's shared proxy is denied by name only: its addresses serve other sites too.
    expect(ask(root, '104.18.20.135', 443, 'tcp')).toEqual({ kernel: 'accept output', explain: 'allow default default' });
  });

  it("lets the resolver's own queries out to an upstream the list denies, and nobody else's", () => {
    for (const [host, port, proto] of [
      ['1.1.1.1', 53, 'udp'],
      ['9.9.9.9', 853, 'tcp'],
      ['2606:4700:4700::1111', 53, 'tcp'],
      ['2620:fe::fe', 853, 'udp'],
    ] as const) {
      expect(ask(root, host, port, proto, MARK)).toEqual({ kernel: 'accept dns_egress', explain: 'allow dns dns/resolver' });
      expect(ask(root, host, port, proto)).toEqual({ kernel: 'drop dns_egress', explain: 'deny dns dns/exclusive' });
    }
  });
});
