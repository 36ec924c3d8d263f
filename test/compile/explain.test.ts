import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { explain, ROUTING_HEADER_NOTE, type ExplainQuery } from '../../src/compile/explain.js';
import { parseWho } from '../../src/cli/commands/explain.js';
import { FACTS, policyFrom } from '../support/compile-text.js';
import { packetFor } from '../support/connection.js';
import { evaluate } from '../support/ruleset-interpreter.js';

/**
 * One policy in which every precedence level has something to say about the
 * same destinations, so each test shows a level winning over the next.
 */
const policy = policyFrom(
  `
defaults: {egress: deny}
identities:
  vault: {user: vault}
  apt: {user: _apt}
  web: [{user: alice}, {flatpak: org.example.Web}]
lists:
  trackers: {names: [tracker.example.com, "*.ads.example.net"]}
apps:
  web:
    identity: web
    default: allow
    rules:
      - allow: [tracker.example.com]
        ports: [443]
      - deny: [198.51.100.0/24]
  vault-sync:
    identity: vault
    rules: [{allow: any}]
  apt-direct:
    identity: apt
    rules: [{allow: any}]
deny:
  - to: ["@trackers", 203.0.113.0/24]
    why: trackers
systemDomains:
  offline: {members: [vault]}
tor:
  enabled: true
  updaters: [apt]
`,
);

const ask = (who: ExplainQuery['who'], host: string, extra: Partial<ExplainQuery> = {}, lockdown = false) => {
  const answer = explain(policy, { who, host, ...extra }, FACTS, { lockdown });
  if ('error' in answer) throw new Error(answer.error);
  return answer;
};

describe('explain: each precedence level against the next', () => {
  it('loopback is allowed even for a system domain', () => {
    expect(ask({ kind: 'name', name: 'vault' }, '127.0.0.1')).toMatchObject({ verdict: 'allow', level: 'loopback' });
    expect(ask({ kind: 'user', user: 'vault' }, '::1')).toMatchObject({ verdict: 'allow', level: 'loopback' });
    // But not DNS there, nor Tor's SOCKS port: a resolver on loopback, or Tor, would carry it out.
    expect(ask({ kind: 'user', user: 'vault' }, '127.0.0.1').notes.join('\n')).toContain('but DNS (ports 53 and 853) is not: system domain "offline" has none');
    for (const [port, proto] of [
      [53, 'udp'],
      [853, 'tcp'],
      [9050, 'tcp'],
    ] as const)
      expect(ask({ kind: 'user', user: 'vault' }, '127.0.0.1', { port, proto })).toMatchObject({ verdict: 'deny', level: 'system-domain' });
  });

  it('system domain beats the app rule that allows everything', () => {
    expect(ask({ kind: 'name', name: 'vault-sync' }, '192.0.2.9', { port: 443 })).toMatchObject({
      verdict: 'deny',
      level: 'system-domain',
      ruleId: 'sd/offline',
    });
  });

  it('lockdown beats Tor confinement and apps, except for Tor itself', () => {
    expect(ask({ kind: 'user', user: 'alice' }, 'example.org', {}, true)).toMatchObject({ verdict: 'deny', level: 'lockdown' });
    expect(ask({ kind: 'user', user: 'debian-tor' }, '192.0.2.7', { port: 9001 }, true)).toMatchObject({ verdict: 'allow', level: 'lockdown' });
  });

  it('Tor confinement beats the app rule allowing the updater everything', () => {
    expect(ask({ kind: 'user', user: '_apt' }, 'deb.debian.org', { port: 443 })).toMatchObject({ verdict: 'deny', level: 'tor', ruleId: 'tor/updaters' });
    expect(ask({ kind: 'user', user: 42 }, '127.0.0.1', { port: 9050 })).toMatchObject({ verdict: 'allow', level: 'tor', ruleId: 'tor/socks' });
    // Not even loopback services: a local resolver or proxy would look up or fetch for the updater.
    expect(ask({ kind: 'user', user: '_apt' }, '127.0.0.53', { port: 53, proto: 'udp' })).toMatchObject({
      verdict: 'deny',
      level: 'tor',
      ruleId: 'tor/updaters',
    });
    expect(ask({ kind: 'user', user: 'debian-tor' }, '192.0.2.7', { port: 9001 })).toMatchObject({ verdict: 'allow', level: 'tor', ruleId: 'tor/own' });
  });

  it('app rules beat the global deny list', () => {
    const answer = ask({ kind: 'name', name: 'web' }, 'tracker.example.com', { port: 443, proto: 'tcp' });
    expect(answer).toMatchObject({ verdict: 'allow', level: 'app', ruleId: 'app/web/0', at: { file: 'f.yaml', line: 14 } });
    expect(ask({ kind: 'name', name: 'web' }, '198.51.100.20')).toMatchObject({ verdict: 'deny', level: 'app', ruleId: 'app/web/1' });
  });

  it('the global deny list beats the app default when no app rule matches', () => {
    expect(ask({ kind: 'name', name: 'web' }, 'tracker.example.com', { port: 80 })).toMatchObject({
      verdict: 'deny',
      level: 'global-deny',
      ruleId: 'deny/f.yaml/0',
      why: 'trackers',
    });
    expect(ask({ kind: 'name', name: 'web' }, 'x.ads.example.net')).toMatchObject({ verdict: 'deny', level: 'global-deny' });
    expect(ask({ kind: 'name', name: 'web' }, '203.0.113.4')).toMatchObject({ verdict: 'deny', level: 'global-deny' });
  });

  it('the default decides last: the app default, else the global one', () => {
    expect(ask({ kind: 'name', name: 'web' }, 'example.org', { port: 443 })).toMatchObject({ verdict: 'allow', level: 'default', ruleId: 'app/web/default' });
    expect(ask({ kind: 'user', user: 'bob' }, 'example.org', { port: 443 })).toMatchObject({ verdict: 'deny', level: 'default', ruleId: 'default' });
  });

  it('a cgroup below a selector matches it, as socket cgroupv2 level N does', () => {
    const scope = 'user.slice/user-1000.slice/user@1000.service/app.slice/app-flatpak-org.example.Web-99.scope';
    expect(ask({ kind: 'cgroup', path: `${scope}/sub` }, 'example.org')).toMatchObject({ verdict: 'allow', ruleId: 'app/web/default' });
    expect(ask({ kind: 'cgroup', path: 'user.slice' }, 'example.org')).toMatchObject({ verdict: 'deny', ruleId: 'default' });
  });

  it('says when the answer depends on a port or protocol that was not given', () => {
    const answer = ask({ kind: 'name', name: 'web' }, 'tracker.example.com');
    expect(answer).toMatchObject({ verdict: 'deny', level: 'global-deny' });
    expect(answer.notes).toContain('app/web/0 (allow) applies to tcp/udp port 443 only; give --to HOST:PORT/PROTO to see it');
  });

  it('says when an address could match a name rule through DNS', () => {
    const answer = ask({ kind: 'user', user: 'bob' }, '192.0.2.200');
    expect(answer.notes).toEqual([
      "dns/exclusive (deny) applies to udp and tcp ports 53 and 853: only the resolver's own packets leave to them",
      "deny/f.yaml/0 also matches 192.0.2.200 while it is a recent DNS answer for one of the rule's names",
    ]);
  });

  it('says that an allowed IPv6 destination does not cover a packet carrying a routing header, which is dropped first', () => {
    expect(ask({ kind: 'name', name: 'web' }, '2001:db8::7').notes).toContain(ROUTING_HEADER_NOTE);
    expect(ask({ kind: 'name', name: 'web' }, 'example.org').notes).toContain(ROUTING_HEADER_NOTE);
    // Where nothing is allowed there is nothing to qualify; IPv4 has no routing header.
    const denied = ask({ kind: 'user', user: 'bob' }, '2001:db8::7');
    expect(denied.verdict).toBe('deny');
    expect(denied.notes).not.toContain(ROUTING_HEADER_NOTE);
    const v4 = ask({ kind: 'name', name: 'web' }, '192.0.2.7');
    expect(v4.verdict).toBe('allow');
    expect(v4.notes).not.toContain(ROUTING_HEADER_NOTE);
  });

  it('an unknown app name is an error listing the known ones', () => {
    expect(explain(policy, { who: { kind: 'name', name: 'nope' }, host: 'x' }, FACTS)).toMatchObject({
      error: expect.stringContaining('known: web, vault-sync, apt-direct'),
    });
  });
});

describe('a unit is asked about where systemd runs it', () => {
  // An instance of a template with no Slice= of its own runs in its template's slice, not in system.slice itself.
  const INSTANCE = 'system.slice/system-vault\\x2dagent.slice/vault-agent@alice.service';
  const facts = { ...FACTS, cgroups: [...FACTS.cgroups, 'system.slice/system-vault\\x2dagent.slice', INSTANCE] };
  const policy = policyFrom('defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{unit: vault-agent@alice.service}]}\n');
  const table = compile(policy, facts).ruleset;

  it('a system-domain member written as a template instance is in the table at its real cgroup, and its packets are dropped', () => {
    expect(table.sets.find((set) => set.name === 'sd_cg_l3')?.elements).toEqual([INSTANCE]);
    for (const cgroup of [INSTANCE, `${INSTANCE}/worker`]) {
      const who = { kind: 'cgroup', path: cgroup } as const;
      expect(evaluate(table, packetFor({ who, address: '192.0.2.5', port: 443, proto: 'tcp' })), cgroup).toMatchObject({
        verdict: 'drop',
        chain: 'sd_offline',
      });
      const answer = explain(policy, { who, host: '192.0.2.5', port: 443, proto: 'tcp' }, facts);
      expect(answer, cgroup).toMatchObject({ verdict: 'deny', level: 'system-domain' });
    }
    // The cgroup systemd never puts it in is nobody's: the default lets it out, and explain agrees.
    const elsewhere = { kind: 'cgroup', path: 'system.slice/vault-agent@alice.service' } as const;
    expect(evaluate(table, packetFor({ who: elsewhere, address: '192.0.2.5', port: 443, proto: 'tcp' }))).toMatchObject({ verdict: 'accept' });
    expect(explain(policy, { who: elsewhere, host: '192.0.2.5', port: 443, proto: 'tcp' }, facts)).toMatchObject({ verdict: 'allow', level: 'default' });
  });

  it('explain --app unit:NAME asks from the cgroup compile matches: one function for both', () => {
    expect(parseWho('unit:vault-agent@alice.service')).toEqual({ kind: 'cgroup', path: INSTANCE });
    expect(parseWho('unit:getty@tty1.service')).toEqual({ kind: 'cgroup', path: 'system.slice/system-getty.slice/getty@tty1.service' });
    expect(parseWho('unit:cups.service')).toEqual({ kind: 'cgroup', path: 'system.slice/cups.service' });
    expect(explain(policy, { who: parseWho('unit:vault-agent@alice.service'), host: '192.0.2.5' }, facts)).toMatchObject({
      verdict: 'deny',
      level: 'system-domain',
    });
    expect(() => parseWho('unit:vault-agent@.service')).toThrow(/is a template, which never runs/);
  });
});

describe('explain answers for the packet the kernel sees', () => {
  const v4Denied = policyFrom(
    // Not exclusive: the udp 53 packet below is about the family the kernel sees, not about who may send DNS.
    'defaults: {egress: allow}\ndeny:\n  - to: [192.0.2.0/24]\n  - to: ["::/0"]\n    proto: udp\nsystemDomains:\n  offline: {members: [{user: vault}]}\ndns: {exclusive: false}\n',
  );
  const table = compile(v4Denied, FACTS).ruleset;
  const both = (host: string, who: ExplainQuery['who'] = { kind: 'user', user: 'alice' }, port = 443, proto: 'tcp' | 'udp' = 'tcp') => {
    const answer = explain(v4Denied, { who, host, port, proto }, FACTS);
    if ('error' in answer) throw new Error(answer.error);
    return { answer, kernel: evaluate(table, packetFor({ who, address: host, port, proto })).verdict };
  };

  it('an IPv4-mapped address is IPv4: denied by the IPv4 rule, never by an IPv6 one', () => {
    for (const host of ['::ffff:192.0.2.5', '::FFFF:c000:205']) {
      const { answer, kernel } = both(host);
      expect(answer).toMatchObject({ verdict: 'deny', level: 'global-deny', ruleId: 'deny/f.yaml/0' });
      expect(answer.notes).toContain(`${host.toLowerCase()} is IPv4-mapped: a dual-stack socket sends to it as IPv4 to 192.0.2.5, so rules for IPv4 decide it`);
      expect(kernel).toBe('drop');
    }
    // ::ffff:0:0/96 lies inside ::/0, but the packet is IPv4: the udp deny of ::/0 never sees it.
    expect(both('::ffff:198.51.100.9', undefined, 53, 'udp')).toMatchObject({ answer: { verdict: 'allow', level: 'default' }, kernel: 'accept' });
  });

  it('loopback is any spelling of an address that leaves through lo, a system domain included', () => {
    const vault = { kind: 'user', user: 'vault' } as const;
    for (const host of ['127.0.0.1', '127.1.2.3', '::1', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', '0.0.0.0', '::']) {
      expect(both(host, vault), host).toMatchObject({ answer: { verdict: 'allow', level: 'loopback' }, kernel: 'accept' });
    }
    expect(both('192.0.2.1', vault)).toMatchObject({ answer: { verdict: 'deny', level: 'system-domain' }, kernel: 'drop' });
  });

  it('with a SOCKS gateway on another host, an updater in a system domain or under lockdown is stopped there, whatever the destination', () => {
    const gateway = policyFrom(
      'identities: {apt: {user: _apt}}\nsystemDomains: {off: {members: [{user: _apt}]}}\ntor: {enabled: true, socks: "192.0.2.50:9050", updaters: [apt]}\n',
    );
    const apt = { kind: 'user', user: '_apt' } as const;
    const table = compile(gateway, FACTS).ruleset;
    for (const host of ['192.0.2.50', '198.51.100.9', '127.0.0.1']) {
      expect(explain(gateway, { who: apt, host, port: 443, proto: 'tcp' }, FACTS), host).toMatchObject({
        verdict: 'deny',
        level: 'system-domain',
        ruleId: 'sd/off',
      });
      expect(evaluate(table, packetFor({ who: apt, address: host, port: 443, proto: 'tcp' })).chain).toBe('sd_off');
    }
    const open = policyFrom('identities: {apt: {user: _apt}}\ntor: {enabled: true, socks: "192.0.2.50:9050", updaters: [apt]}\n');
    const locked = compile(open, FACTS, { lockdown: true }).ruleset;
    for (const host of ['192.0.2.50', '198.51.100.9']) {
      expect(explain(open, { who: apt, host, port: 9050, proto: 'tcp' }, FACTS, { lockdown: true }), host).toMatchObject({
        verdict: 'deny',
        level: 'lockdown',
      });
      expect(evaluate(locked, packetFor({ who: apt, address: host, port: 9050, proto: 'tcp' })).chain).toBe('lockdown');
    }
  });

  it("a non-canonical spelling of Tor's SOCKS address is still the SOCKS address", () => {
    const socks = policyFrom('identities: {apt: {user: _apt}}\ntor: {enabled: true, socks: "[2001:db8::9]:9150", updaters: [apt]}\n');
    const answer = explain(socks, { who: { kind: 'user', user: '_apt' }, host: '2001:DB8:0::9', port: 9150, proto: 'tcp' }, FACTS);
    expect(answer).toMatchObject({ verdict: 'allow', level: 'tor', ruleId: 'tor/socks' });
    expect(
      evaluate(compile(socks, FACTS).ruleset, packetFor({ who: { kind: 'user', user: '_apt' }, address: '2001:DB8:0::9', port: 9150, proto: 'tcp' })).verdict,
    ).toBe('accept');
  });

  it("only Tor's user or root answers from a SOCKS port on loopback: the table drops another listener's answers, and explain says so", () => {
    const { ruleset } = compile(policy, FACTS);
    // What a listener on 127.0.0.1:9050 sends back to a client's port: its SYN-ACK (from a request socket, the listener's uid), then data.
    const answer = {
      oif: 'lo',
      family: 4,
      daddr: '127.0.0.1',
      saddr: '127.0.0.1',
      l4proto: 'tcp',
      sport: 9050,
      dport: 40001,
      cgroup: '',
      ct: 'established',
    } as const;
    for (const fullSocket of [false, true]) {
      expect(evaluate(ruleset, { ...answer, fullSocket, skuid: 1000 })).toMatchObject({ verdict: 'drop', chain: 'log_tor_socks_answer' });
      expect(evaluate(ruleset, { ...answer, fullSocket, skuid: 42 })).toMatchObject({ verdict: 'drop', chain: 'log_tor_socks_answer' });
      expect(evaluate(ruleset, { ...answer, fullSocket, skuid: 110 })).toMatchObject({ verdict: 'accept' });
      // Debian starts Tor as root, and Tor opens its listeners before it becomes debian-tor.
      expect(evaluate(ruleset, { ...answer, fullSocket, skuid: 0 })).toMatchObject({ verdict: 'accept' });
    }
    // The kernel's own reset (no owner) carries nothing; another port or address of loopback is not Tor's.
    expect(evaluate(ruleset, { ...answer })).toMatchObject({ verdict: 'accept' });
    expect(evaluate(ruleset, { ...answer, skuid: 1000, sport: 9051 })).toMatchObject({ verdict: 'accept' });
    expect(evaluate(ruleset, { ...answer, skuid: 1000, saddr: '127.0.0.2' })).toMatchObject({ verdict: 'accept' });
    // Explain is about who asks; who may answer is a note, for an updater and anyone else asking for the SOCKS port.
    for (const user of ['_apt', 'alice']) {
      const said = ask({ kind: 'user', user }, '127.0.0.1', { port: 9050 });
      expect(said.verdict).toBe('allow');
      expect(
        said.notes.some((n) => n.startsWith('tor/socks-answer: only Tor\'s user "debian-tor" or root may answer from 127.0.0.1:9050')),
        user,
      ).toBe(true);
    }
    expect(ask({ kind: 'user', user: 'alice' }, '127.0.0.1', { port: 631 }).notes.some((n) => n.startsWith('tor/socks-answer'))).toBe(false);
  });
});

describe('explain asks for a name in the form resolvers are asked for it', () => {
  const idn = policyFrom(
    `
defaults: {egress: allow}
lists:
  blocked: {file: blocked.txt}
deny:
  - to: ["@blocked", bücher.example]
  - to: [10.0.0.0/8]
`,
    { 'blocked.txt': 'münchen.example\n' },
  );
  const who = { kind: 'user', user: 'alice' } as const;
  const verdictFor = (host: string) => {
    const answer = explain(idn, { who, host }, FACTS);
    if ('error' in answer) throw new Error(answer.error);
    return answer;
  };

  it('an IDN written in a list or a rule and asked in either form gets one answer', () => {
    for (const host of ['münchen.example', 'MÜNCHEN.example', 'xn--mnchen-3ya.example', 'bücher.example', 'xn--bcher-kva.example']) {
      expect(verdictFor(host), host).toMatchObject({ verdict: 'deny', level: 'global-deny' });
    }
    expect(verdictFor('münchen.example').notes).toContain('münchen.example is asked for as xn--mnchen-3ya.example, its IDNA ASCII form');
    expect(verdictFor('muenchen.example')).toMatchObject({ verdict: 'allow', level: 'default' });
  });

  it('what libc reads as an IPv4 address is that address', () => {
    for (const host of ['0x0a.0.0.1', '012.0.0.1', '10.1', '167772161', '０ｘ０ａ.0.0.1']) {
      const answer = verdictFor(host);
      expect(answer, host).toMatchObject({ verdict: 'deny', level: 'global-deny', ruleId: 'deny/f.yaml/1' });
    }
    expect(verdictFor('0x0a.0.0.1').notes).toContain('libc reads 0x0a.0.0.1 as the IPv4 address 10.0.0.1, so a program connecting to it connects to 10.0.0.1');
  });

  it('an invalid IDN is an error, not a name', () => {
    expect(explain(idn, { who, host: 'ab\u200d.example' }, FACTS)).toEqual({ error: '"ab\u200d.example" is not a valid internationalised (IDNA) name' });
  });
});
