import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { compile } from '../../src/compile/compile.js';
import { appTags, markValue } from '../../src/compile/ct-mark.js';
import { renderJson, renderText, safeText, type ChainDecl, type RuleDecl } from '../../src/compile/ruleset.js';
import { resolvePolicy } from '../../src/policy/resolve.js';
import { nftAvailable, nftCheck } from '../support/nft-check.js';
import { compileYaml, FACTS, policyFrom } from '../support/compile-text.js';
import { arbPolicy, GEN_FACTS } from '../support/policy-gen.js';
import { evaluate, type Packet } from '../support/ruleset-interpreter.js';

const chain = (compiled: ReturnType<typeof compileYaml>, name: string): ChainDecl => {
  const found = compiled.ruleset.chains.find((c) => c.name === name);
  if (!found) throw new Error(`no chain ${name}`);
  return found;
};
/** A rule as nft text, without its fingerprint (tested on its own below). */
const ruleText = (r: RuleDecl): string =>
  renderText({ table: { family: 'inet', name: 't' }, sets: [], chains: [{ name: 'c', rules: [r] }] })
    .split('\n')[2]!
    .trim()
    .replace(/ #[0-9a-f]{8}"$/, '"');

/** A rule's short id in the compiled table (log prefixes and comments carry it). */
const sid = (compiled: ReturnType<typeof compileYaml>, ruleId: string): string => {
  const entry = compiled.ruleIds.find((e) => e.ruleId === ruleId);
  if (!entry) throw new Error(`no short id for ${ruleId}`);
  return entry.id;
};

describe('compiler', () => {
  it('orders the output chain by precedence: Tor updaters, loopback, system domain, lockdown, Tor itself, apps, global deny, default (its own established connections, then deny)', () => {
    const compiled = compileYaml(
      `
defaults: {egress: deny}
identities: {apt: {user: _apt}, vault: {user: vault}}
apps: {web: {identity: {user: alice}, rules: [{allow: any}]}}
deny: [{to: [192.0.2.0/24]}]
systemDomains: {offline: {members: [vault]}}
tor: {enabled: true, updaters: [apt]}
`,
      { lockdown: true },
    );
    const output = chain(compiled, 'output').rules.map(ruleText);
    const position = (fragment: string) => {
      const index = output.findIndex((line) => line.includes(fragment));
      expect(index, `"${fragment}" in\n${output.join('\n')}`).toBeGreaterThanOrEqual(0);
      return index;
    };
    const order = [
      position(`ip6 nexthdr 43 rt type != 2 goto routing_header comment "${sid(compiled, 'routing-header')} routing-header: IPv6 routing headers"`),
      position('vmap @tor_uid'),
      position('meta oif "lo" jump loopback comment "loopback; policy sha256:'),
      position('vmap @sd_uid'),
      position(`tcp flags & (syn | ack) syn,ack jump syn_cookies comment "${sid(compiled, 'syn-cookies')} f.yaml:6 syn-cookies: SYN-ACKs sent from no socket"`),
      position('goto lockdown'),
      position(`meta skuid 110 counter accept comment "${sid(compiled, 'tor/own')} f.yaml`),
      position('vmap @app_uid'),
      position('jump global_deny'),
      position(
        `ct state established,related ct mark & 0xffff0000 0x00010000 accept comment "${sid(compiled, 'default')} f.yaml:2 default: its own established and related connections"`,
      ),
      position(
        `ct direction reply ct mark & 0xffff0000 0x00000000 socket mark 0-4294967295 ct mark set ct mark & 0x0000ffff | 0x00010000 accept comment "${sid(compiled, 'default')} f.yaml:2 default: answers on connections that came in, claimed"`,
      ),
      position(
        `ct direction reply ct mark & 0xffff0000 0x00000000 accept comment "${sid(compiled, 'default')} f.yaml:2 default: answers from a socket not yet full, unclaimed"`,
      ),
      position(`ct state established,related jump ownerless comment "${sid(compiled, 'default')} f.yaml:2 default: established, without an owner"`),
      position(`log prefix "egd ${sid(compiled, 'default')} "`),
    ];
    // Right before the default's log rule, together: every explicit deny comes first.
    expect(order.slice(-5)).toEqual([0, 1, 2, 3, 4].map((i) => order.at(-5)! + i));
    expect([...order].sort((a, b) => a - b)).toEqual(order);
    expect(chain(compiled, 'output').hook).toEqual({ hook: 'output', prio: 0, policy: 'drop' });
    expect(output.at(-1)).toMatch(new RegExp(`^counter drop comment "${sid(compiled, 'default')} f\\.yaml:2 default`));
  });

  it('drops every IPv6 packet with a routing header but type 2 first, before the updaters, loopback and everything that accepts on the destination; logged and counted under its own id', () => {
    const tor = (socks: string) => `
defaults: {egress: allow}
identities: {apt: {user: _apt}}
apps: {web: {identity: {user: alice}, rules: [{allow: [192.0.2.9]}]}}
tor: {enabled: true, socks: "${socks}", updaters: [apt]}
`;
    for (const [yaml, lockdown] of [
      ['defaults: {egress: deny}\n', false],
      [tor('192.0.2.50:9050'), false],
      [tor('[::1]:9050'), true],
    ] as const) {
      const compiled = compileYaml(yaml, { lockdown });
      const id = sid(compiled, 'routing-header');
      const output = chain(compiled, 'output').rules;
      expect(ruleText(output[0]!), yaml).toBe(`ip6 nexthdr 43 rt type != 2 goto routing_header comment "${id} routing-header: IPv6 routing headers"`);
      // Nothing else looks at routing headers, and no other rule sends packets to its chain.
      expect(renderText(compiled.ruleset).match(/\brt type\b/g)).toHaveLength(1);
      expect(renderText(compiled.ruleset).match(/\brouting_header\b/g)).toHaveLength(2);
      expect(chain(compiled, 'routing_header').rules.map(ruleText)).toEqual([
        `update @lograte_${id} { meta skuid limit rate 10/second burst 20 packets } log prefix "egd ${id} " group 7745 counter drop comment "${id} routing-header"`,
        `meta skuid 0-4294967295 counter drop comment "${id} routing-header"`,
        `limit rate 10/second burst 20 packets log prefix "egd ${id} " group 7745 comment "${id} routing-header"`,
        `counter drop comment "${id} routing-header"`,
      ]);
      expect(compiled.ruleIds.find((e) => e.id === id)).toEqual({ id, ruleId: 'routing-header', kind: 'routing-header', verdict: 'deny' });
      expect(renderJson(compiled.ruleset).nftables).toContainEqual({
        rule: expect.objectContaining({
          chain: 'output',
          expr: [
            { match: { op: '==', left: { payload: { protocol: 'ip6', field: 'nexthdr' } }, right: 43 } },
            { match: { op: '!=', left: { exthdr: { name: 'rt', field: 'type' } }, right: 2 } },
            { goto: { target: 'routing_header' } },
          ],
        }),
      });
    }
    // Without denial logging it still drops and counts.
    const quiet = compileYaml('defaults: {egress: deny, log: {denials: false}}\n');
    expect(chain(quiet, 'routing_header').rules.map(ruleText)).toEqual([`counter drop comment "${sid(quiet, 'routing-header')} routing-header"`]);
  });

  it('a packet with a routing header is dropped at routing_header whoever sends it and wherever it goes, Tor and updaters included; type 2 and none are decided as before', () => {
    const compiled = compileYaml(
      `
defaults: {egress: allow}
identities: {apt: {user: _apt}}
apps: {web: {identity: {user: alice}, rules: [{allow: ["2001:db8::9"]}], default: deny}}
tor: {enabled: true, socks: "[2001:db8::50]:9050", updaters: [apt]}
`,
    );
    const ids = FACTS.users;
    const packets: Packet[] = [
      { oif: 'eth0', family: 6, daddr: '2001:db8::9', l4proto: 'tcp', dport: 443, skuid: ids.get('alice') as number, skgid: 100, cgroup: '', ct: 'new' },
      { oif: 'eth0', family: 6, daddr: '2001:db8::50', l4proto: 'tcp', dport: 9050, skuid: ids.get('_apt') as number, skgid: 100, cgroup: '', ct: 'new' },
      { oif: 'eth0', family: 6, daddr: '2001:db8::77', l4proto: 'udp', dport: 53, skuid: ids.get('debian-tor') as number, skgid: 100, cgroup: '', ct: 'new' },
      { oif: 'lo', family: 6, daddr: '::1', l4proto: 'tcp', dport: 80, skuid: 0, skgid: 0, cgroup: '', ct: 'established' },
    ];
    for (const packet of packets) {
      expect(evaluate(compiled.ruleset, packet), JSON.stringify(packet)).toMatchObject({ verdict: 'accept' });
      expect(evaluate(compiled.ruleset, { ...packet, routingHeader: 2 })).toMatchObject({ verdict: 'accept' });
      for (const routingHeader of [0, 3, 4, 253])
        expect(evaluate(compiled.ruleset, { ...packet, routingHeader })).toMatchObject({ verdict: 'drop', chain: 'routing_header' });
    }
  });

  it("Tor's SOCKS port on loopback is network for all but the updaters: a system domain's member, lockdown and an app's default deny stop it there; other loopback ports stay open", () => {
    const policy = `
defaults: {egress: allow}
identities: {apt: {user: _apt}, vault: {user: vault}}
apps: {web: {identity: {user: alice}, rules: [{allow: ["198.51.100.9"]}], default: deny}}
systemDomains: {offline: {members: [vault]}}
tor: {enabled: true, updaters: [apt]}
`;
    const ids = FACTS.users;
    const uid = (name: string) => ids.get(name) as number;
    const toLoopback = (skuid: number, dport: number, daddr = '127.0.0.1'): Packet => ({
      oif: 'lo',
      family: 4,
      daddr,
      l4proto: 'tcp',
      dport,
      skuid,
      skgid: 100,
      cgroup: '',
      ct: 'new',
    });
    const open = compileYaml(policy);
    const decided = (packet: Packet, lockdown = false) => {
      const outcome = evaluate((lockdown ? compileYaml(policy, { lockdown: true }) : open).ruleset, packet);
      return `${outcome.verdict} ${outcome.chain}`;
    };
    // The member reached the internet through Tor: its SYN to the SOCKS port was accepted as loopback.
    expect(decided(toLoopback(uid('vault'), 9050))).toBe('drop sd_offline');
    expect(decided(toLoopback(uid('vault'), 9050, '127.0.0.2'))).toBe('drop sd_offline');
    expect(decided(toLoopback(uid('alice'), 9050))).toMatch(/^drop /);
    expect(decided(toLoopback(0, 9050), true)).toBe('drop lockdown');
    expect(decided(toLoopback(uid('_apt'), 9050))).toBe('accept tor_updaters');
    expect(decided(toLoopback(uid('_apt'), 9050), true)).toBe('accept tor_updaters');
    // Under the default allow, an identity with no app reaches it as it reaches any address.
    expect(decided(toLoopback(0, 9050))).toBe('accept output');
    for (const who of [uid('vault'), uid('alice'), 0]) {
      expect(decided(toLoopback(who, 631))).toBe('accept loopback');
      expect(decided({ ...toLoopback(who, 9050), l4proto: 'udp' })).toBe('accept loopback');
    }
    expect(decided(toLoopback(uid('vault'), 631), true)).toBe('accept loopback');
  });

  it("an identity chosen by cgroup has the chains the tracker sends new members to before any member exists; a cut-off chain only where a glob's wildcard can match a name nft cannot carry", () => {
    const compiled = compileYaml(`
apps:
  build: {identity: {user: alice}}
  web: {identity: {cgroup: "apps/web-*"}, default: deny}
  printer: {identity: {unit: cups.service}, default: deny}
  viewer: {identity: {cgroup: "apps/viewer"}, default: allow}
`);
    const chains = compiled.ruleset.chains.map((c) => c.name);
    const binding = (owner: string) => compiled.cgroupBindings.find((b) => b.owner === owner)!;
    expect(binding('app web')).toMatchObject({ delegatedVerdict: { goto: { target: 'uc_app_web' } }, cutOff: { goto: { target: 'cut_app_web' } } });
    expect(binding('app printer').delegatedVerdict).toEqual({ goto: { target: 'uc_app_printer' } });
    expect(binding('app printer').cutOff).toBeUndefined();
    expect(binding('app viewer').delegatedVerdict).toEqual({ goto: { target: 'uc_app_viewer' } });
    expect(binding('app viewer').cutOff).toBeUndefined();
    for (const name of ['uc_app_web', 'cut_app_web', 'uc_app_printer', 'uc_app_viewer']) expect(chains).toContain(name);
    expect(chains).not.toContain('cut_app_printer');
    expect(chains).not.toContain('cut_app_viewer');
  });

  it('a policy without a default deny has no conntrack expression at all, lockdown, system domains and Tor included', () => {
    const yaml = `
defaults: {egress: allow}
identities: {apt: {user: _apt}, vault: {user: vault}}
apps:
  web: {identity: {user: alice}, rules: [{deny: [192.0.2.9]}, {allow: any}]}
  gpg: {identity: {unit: gpg.service}, default: allow, rules: [{deny: any, proto: udp}]}
deny: [{to: [198.51.100.0/24]}, {to: [x.example.org], log: false}]
systemDomains: {offline: {members: [vault]}}
tor: {enabled: true, updaters: [apt]}
`;
    for (const lockdown of [false, true]) {
      const compiled = compileYaml(yaml, { lockdown });
      expect(JSON.stringify(compiled.ruleset)).not.toContain('"ct"');
      expect(renderText(compiled.ruleset)).not.toMatch(/\bct (state|direction|status|mark)\b/);
    }
  });

  it("each default deny, and only a default deny, is preceded by exactly one established/related accept (its own identity's), and in the global default one for packets without an owner", () => {
    // An established accept; a default allow's `ct state new` marks and decides nothing.
    const ct = (r: RuleDecl) => JSON.stringify(r.expr).includes('"established"');
    let compiled: ReturnType<typeof compileYaml>;
    const tailStart = (c: ChainDecl, id: string) => c.rules.findIndex((r) => ruleText(r).includes(`log prefix "egd ${sid(compiled, id)} "`));
    for (const egress of ['allow', 'deny'] as const) {
      compiled = compileYaml(
        `
defaults: {egress: ${egress}}
identities: {apt: {user: _apt}, vault: {user: vault}}
apps:
  closed: {identity: {user: alice}, default: deny, rules: [{allow: [192.0.2.1]}, {deny: [192.0.2.0/24]}]}
  open: {identity: {unit: gpg.service}, default: allow, rules: [{deny: [192.0.2.0/24]}]}
deny: [{to: [198.51.100.0/24]}]
systemDomains: {offline: {members: [vault]}}
tor: {enabled: true, socks: "192.0.2.50:9050", updaters: [apt]}
`,
        { lockdown: true },
      );
      const counts = Object.fromEntries(compiled.ruleset.chains.map((c) => [c.name, c.rules.filter(ct).length]));
      expect(counts, egress).toEqual({
        output: egress === 'deny' ? 2 : 0,
        app_closed: 1,
        app_open: 0,
        sd_offline: 0,
        lockdown: 0,
        routing_header: 0,
        // vault, a member found by user: SYN-ACKs sent from no socket are dropped.
        syn_cookies: 0,
        tor_updaters: 0,
        link_local: 0,
        // DNS on loopback goes through the system domains' dispatch.
        loopback: 0,
        loopback_dns: 0,
        global_deny: 0,
        global_deny_app_open: 0,
        dns_egress: 0,
        log_g0: 0,
        log_g0_global_deny_app_open: 0,
        // Its delegated members' chain (gpg.service may be delegated), made whether or not one exists.
        uc_app_open: 0,
        uc_root_app_open: 0,
        log_a_closed_1: 0,
        log_a_open_0: 0,
        ...(egress === 'deny' ? { ownerless: 0 } : {}),
        // closed's own allow, replayed for packets without an owner on its connections (conntrack is on for its default deny).
        ownerless_app_closed: 0,
      });
      const closed = chain(compiled, 'app_closed');
      const at = tailStart(closed, 'app/closed/default');
      expect(at).toBeGreaterThan(0);
      const closedTag = markValue(appTags(['closed', 'open']).get('closed')!);
      expect(ruleText(closed.rules[at - 3]!)).toBe(
        `ct state established,related ct mark & 0xffff0000 ${closedTag} accept comment "${sid(compiled, 'app/closed/default')} f.yaml:5 app/closed/default: its own established and related connections"`,
      );
      expect(ruleText(closed.rules[at - 2]!)).toBe(
        `ct direction reply ct mark & 0xffff0000 0x00000000 socket mark 0-4294967295 ct mark set ct mark & 0x0000ffff | ${closedTag} accept comment "${sid(compiled, 'app/closed/default')} f.yaml:5 app/closed/default: answers on connections that came in, claimed"`,
      );
      expect(ruleText(closed.rules[at - 1]!)).toBe(
        `ct direction reply ct mark & 0xffff0000 0x00000000 accept comment "${sid(compiled, 'app/closed/default')} f.yaml:5 app/closed/default: answers from a socket not yet full, unclaimed"`,
      );
      // After the app's own rules and the global deny list: they cut established connections too.
      expect(ruleText(closed.rules[at - 4]!)).toMatch(/^jump global_deny /);
      if (egress === 'deny') {
        const output = chain(compiled, 'output');
        expect(output.rules.findIndex(ct)).toBe(tailStart(output, 'default') - 4);
        expect(ruleText(output.rules[tailStart(output, 'default') - 1]!)).toMatch(/^ct state established,related jump ownerless /);
        expect(chain(compiled, 'ownerless').rules.map(ruleText)).toEqual([
          'meta skuid 0-4294967295 return comment "a socket with an owner"',
          'accept comment "the kernel\'s own packets"',
        ]);
      }
    }
  });

  it("a server in an app whose default is deny: its SYN-ACK (a request socket's, which cgroups cannot place) claims nothing, and the server's first answer makes the connection its app's", () => {
    for (const egress of ['allow', 'deny'] as const) {
      const compiled = compileYaml(
        `defaults: {egress: ${egress}}\napps:\n  web: {identity: {unit: b.service}, default: deny}\n  www: {identity: {user: 1000}, default: deny}\n`,
      );
      const tags = appTags(['web', 'www']);
      const reply: Packet = {
        oif: 'eth0',
        family: 4,
        daddr: '203.0.113.9',
        l4proto: 'tcp',
        dport: 40000,
        skuid: 33,
        cgroup: 'system.slice/b.service',
        ct: 'established',
        ctDirection: 'reply',
      };
      // The SYN-ACK falls through the cgroup map to the global default: it passes and leaves the connection unclaimed.
      const synAck = evaluate(compiled.ruleset, { ...reply, fullSocket: false });
      expect(synAck, egress).toMatchObject({ verdict: 'accept', ctMark: 0 });
      expect(synAck.path, egress).not.toContain('app_web');
      // The server's own socket answers next: web claims it, and its answers go on passing as web's.
      const first = evaluate(compiled.ruleset, reply);
      expect(first, egress).toMatchObject({ verdict: 'accept', chain: 'app_web', ctMark: tags.get('web')! * 0x10000 });
      expect(evaluate(compiled.ruleset, { ...reply, ctMark: first.ctMark }), egress).toMatchObject({ verdict: 'accept', chain: 'app_web' });
      // A SYN-ACK of a server found by user is its listener's: www claims nothing on it either, and its socket does.
      const byUser = { ...reply, skuid: 1000, cgroup: '' };
      expect(evaluate(compiled.ruleset, { ...byUser, fullSocket: false }), egress).toMatchObject({ verdict: 'accept', ctMark: 0 });
      expect(evaluate(compiled.ruleset, byUser), egress).toMatchObject({ verdict: 'accept', ctMark: tags.get('www')! * 0x10000 });
    }
  });

  it('drops SYN-ACKs sent from no socket (SYN cookies) while a system domain has members found by user or group, and only then', () => {
    // A closed socket keeps no user or group: what a member left to one on a connection its SYN cookie opened would leave
    // without an owner, and nothing after could tell whose it is. So the connection must not open.
    const policy = (members: string, egress = 'allow') => `defaults: {egress: ${egress}}\nsystemDomains:\n  offline: {members: [${members}]}\n`;
    // Another's SYN-ACK, from the request socket of a listener: no owner, and not a full socket.
    const synAck: Packet = {
      oif: 'eth0',
      family: 4,
      daddr: '203.0.113.9',
      l4proto: 'tcp',
      dport: 40000,
      cgroup: '',
      ct: 'established',
      ctDirection: 'reply',
      tcpFlags: ['syn', 'ack'],
      fullSocket: false,
    };
    // A SYN cookie's: from no socket at all.
    const cookie: Packet = { ...synAck, noSocket: true };
    for (const members of ['{user: vault}', '{group: 12}']) {
      for (const egress of ['allow', 'deny']) {
        const compiled = compileYaml(policy(members, egress));
        const dropped = evaluate(compiled.ruleset, cookie);
        expect(dropped, `${members} ${egress}`).toMatchObject({ verdict: 'drop', chain: 'syn_cookies' });
        expect(ruleText(dropped.rule!)).toBe(`counter drop comment "${sid(compiled, 'syn-cookies')} f.yaml:3 syn-cookies"`);
        // A listener's own SYN-ACK (its request socket reads the listener's owner) meets the rules as before; a member's is
        // the system domain's. A service in the kernel (nfsd, ksmbd) answers from a socket without an owner: not a cookie either.
        expect(evaluate(compiled.ruleset, { ...synAck, skuid: 1000 }), egress).toMatchObject({ verdict: 'accept' });
        expect(evaluate(compiled.ruleset, synAck), egress).toMatchObject({ verdict: 'accept' });
        if (members === '{user: vault}') expect(evaluate(compiled.ruleset, { ...synAck, skuid: 990 })).toMatchObject({ verdict: 'drop', chain: 'sd_offline' });
        // Other packets from no socket, and cookies over loopback, are not its business.
        for (const tcpFlags of [['ack'], ['fin', 'ack'], ['rst']] as const)
          expect(evaluate(compiled.ruleset, { ...cookie, tcpFlags }), tcpFlags.join()).not.toMatchObject({ chain: 'syn_cookies' });
        expect(evaluate(compiled.ruleset, { ...cookie, oif: 'lo', daddr: '127.0.0.1' })).toMatchObject({ verdict: 'accept' });
      }
    }
    // Members found by cgroup keep their cgroup on a closed socket: SYN cookies stay, and the rule is not made.
    const byUnit = compileYaml(policy('{unit: gpg.service}'));
    expect(byUnit.ruleset.chains.map((c) => c.name)).not.toContain('syn_cookies');
    expect(evaluate(byUnit.ruleset, cookie)).toMatchObject({ verdict: 'accept' });
    // No log without denial logging; the drop still counts.
    const quiet = compileYaml(`defaults: {egress: allow, log: {denials: false}}\nsystemDomains:\n  offline: {members: [{user: vault}]}\n`);
    expect(chain(quiet, 'syn_cookies').rules.map(ruleText)).toEqual([
      `socket transparent 0-1 return comment "a SYN-ACK from a socket: the rules below decide"`,
      `counter drop comment "${sid(quiet, 'syn-cookies')} f.yaml:3 syn-cookies"`,
    ]);
  });

  it('warns where the kernel sends every SYN-ACK with a cookie (tcp_syncookies=2), which the drop then takes', () => {
    const yaml = 'systemDomains:\n  offline: {members: [{user: vault}]}\n';
    const warned = (tcpSyncookies: number | undefined) =>
      compile(policyFrom(yaml), { ...FACTS, ...(tcpSyncookies === undefined ? {} : { tcpSyncookies }) }).warnings.map((w) => w.message);
    expect(warned(2)).toEqual([expect.stringContaining('net.ipv4.tcp_syncookies is 2 here: every SYN-ACK is sent with a SYN cookie')]);
    for (const value of [0, 1, undefined]) expect(warned(value), String(value)).toEqual([]);
    expect(compile(policyFrom('systemDomains:\n  offline: {members: [{unit: x.service}]}\n'), { ...FACTS, tcpSyncookies: 2 }).warnings).toEqual([]);
  });

  it("a closed socket's packets (without an owner) pass the global deny list only where their app's own rule lets them", () => {
    // Sent after close() — queued data, a FIN, the last ACK from TIME_WAIT — a packet has no owner, so no app is found for it.
    // Its connection's tag names the app, but not that the app's rules let it out: a default allow tags new connections too,
    // and the list outranks it. So a program that opened a connection before its address was listed (by a name's answer, which
    // no apply cuts), queued data and closed its socket would send it past the list, were a tag enough. The app's rules before
    // the list are replayed instead: an allow passes, a deny leaves the packet to the list.
    const compiled = compileYaml(
      `defaults: {egress: allow}
apps:
  fan: {identity: {user: 1000}, default: deny, rules: [{deny: [203.0.113.66]}, {allow: [203.0.113.0/25]}, {allow: ["api.example.org"], ports: [443]}, {allow: [198.51.100.7]}, {deny: [203.0.113.0/24]}]}
  loose: {identity: {user: 1001}}
  quiet: {identity: {user: 1002}, default: deny, rules: [{deny: [192.0.2.0/24]}]}
deny: [{to: [203.0.113.0/24]}, {to: [198.51.100.0/24], log: false}]
`,
    );
    const tags = appTags(['fan', 'loose', 'quiet']);
    const bits = (app: string) => tags.get(app)! * 0x10000;
    const packet: Packet = { oif: 'eth0', family: 4, daddr: '203.0.113.9', l4proto: 'tcp', dport: 443, skuid: 1001, cgroup: '', ct: 'established' };
    // loose's packet, with an owner, on its connection to an address listed since: the list drops it.
    expect(evaluate(compiled.ruleset, { ...packet, ctMark: bits('loose') })).toMatchObject({ verdict: 'drop' });
    const { skuid: _owner, ...closed } = packet;
    // fan's own allow: its packet without an owner passes, as the same packet from its socket does.
    expect(evaluate(compiled.ruleset, { ...closed, ctMark: bits('fan') })).toMatchObject({ verdict: 'accept', chain: 'ownerless_app_fan' });
    expect(evaluate(compiled.ruleset, { ...packet, skuid: 1000, ctMark: bits('fan') })).toMatchObject({ verdict: 'accept', chain: 'app_fan' });
    // Not past a deny of fan's before the allow, nor where no allow of fan's names it: the list drops them.
    expect(evaluate(compiled.ruleset, { ...closed, daddr: '203.0.113.66', ctMark: bits('fan') })).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    expect(evaluate(compiled.ruleset, { ...closed, daddr: '203.0.113.200', ctMark: bits('fan') })).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    // Nor a SYN: a SYN-ACK sent with SYN cookies has no owner, and a process that bound the port fan's server left could answer on
    // fan's stale connection with it (conntrack resyncs the entry, tag and all), then send from a socket it closed.
    const cookie: Packet = { ...closed, ctMark: bits('fan'), ctDirection: 'reply', tcpFlags: ['syn', 'ack'] };
    expect(evaluate(compiled.ruleset, cookie)).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    // Its FIN, reset and data are replayed; other protocols are not (only TCP sends after close()).
    for (const tcpFlags of [['fin', 'ack'], ['rst'], ['psh', 'ack']] as const)
      expect(evaluate(compiled.ruleset, { ...closed, tcpFlags, ctMark: bits('fan') }), tcpFlags.join()).toMatchObject({ verdict: 'accept' });
    expect(evaluate(compiled.ruleset, { ...closed, l4proto: 'udp', ctMark: bits('fan') })).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    // A name's addresses are replayed from the rule's own sets, with its ports.
    const named = {
      ...compiled.ruleset,
      sets: compiled.ruleset.sets.map((set) => (set.name === 'a_fan_2_dns4' ? { ...set, elements: ['203.0.113.200'] } : set)),
    };
    expect(evaluate(named, { ...closed, daddr: '203.0.113.200', ctMark: bits('fan') })).toMatchObject({ verdict: 'accept', chain: 'ownerless_app_fan' });
    expect(evaluate(named, { ...closed, daddr: '203.0.113.200', dport: 80, ctMark: bits('fan') })).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    // loose allows by default only, quiet allows nothing: the list drops what their closed sockets send.
    for (const app of ['loose', 'quiet'])
      expect(evaluate(compiled.ruleset, { ...closed, ctMark: bits(app) }), app).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    expect(evaluate(compiled.ruleset, { ...closed, ctMark: 0 })).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    // A rule of the list that does not log drops in a chain of its own, which asks the map first as well, and counts its drops.
    expect(evaluate(compiled.ruleset, { ...closed, daddr: '198.51.100.7', ctMark: bits('fan') })).toMatchObject({
      verdict: 'accept',
      chain: 'ownerless_app_fan',
    });
    const unlogged = evaluate(compiled.ruleset, { ...closed, daddr: '198.51.100.8', ctMark: bits('fan') });
    expect(unlogged).toMatchObject({ verdict: 'drop', chain: 'drop_g1' });
    expect(ruleText(unlogged.rule!)).toBe(`counter drop comment "${sid(compiled, 'deny/f.yaml/1')} f.yaml:6 deny/f.yaml/1"`);
    // A packet with an owner but no app of its own on fan's connection (a uid no app names) is not replayed: the list decides.
    expect(evaluate(compiled.ruleset, { ...packet, skuid: 4242, ctMark: bits('fan') })).toMatchObject({ verdict: 'drop', chain: 'log_g0' });
    // Only apps with an allow get a chain, and it ends at their last allow.
    expect(compiled.ruleset.chains.map((c) => c.name).filter((name) => name.startsWith('ownerless_app_'))).toEqual(['ownerless_app_fan']);
    expect(chain(compiled, 'ownerless_app_fan').rules.map(ruleText)).toEqual([
      'meta skuid 0-4294967295 return comment "a socket with an owner: its identity decided"',
      `ip daddr @a_fan_0_net4 return comment "${sid(compiled, 'app/fan/0')} f.yaml:3 app/fan/0: without an owner, on its connection"`,
      `ip daddr @a_fan_1_net4 counter accept comment "${sid(compiled, 'app/fan/1')} f.yaml:3 app/fan/1: without an owner, on its connection"`,
      `ip daddr @a_fan_2_dns4 meta l4proto @proto_tcp_udp th dport 443 counter accept comment "${sid(compiled, 'app/fan/2')} f.yaml:3 app/fan/2: without an owner, on its connection"`,
      `ip6 daddr @a_fan_2_dns6 meta l4proto @proto_tcp_udp th dport 443 counter accept comment "${sid(compiled, 'app/fan/2')} f.yaml:3 app/fan/2: without an owner, on its connection"`,
      `ip daddr @a_fan_3_net4 counter accept comment "${sid(compiled, 'app/fan/3')} f.yaml:3 app/fan/3: without an owner, on its connection"`,
    ]);
    // Asked only where the list drops: its log chain (and an unlogged rule's drop chain) asks the map first; nothing else does.
    const asking = compiled.ruleset.chains.filter((c) => c.rules.some((r) => ruleText(r).includes('@ownerless_tags'))).map((c) => c.name);
    expect(asking).toEqual(['log_g0', 'drop_g1']);
    expect(ruleText(chain(compiled, 'log_g0').rules[0]!)).toBe(
      `tcp flags & syn 0 ct mark & 0xffff0000 vmap @ownerless_tags comment "TCP on an app's connection without an owner: that app's own rules first"`,
    );
    expect(compiled.ruleset.sets.find((set) => set.name === 'ownerless_tags')).toMatchObject({
      key: 'mark',
      map: 'verdict',
      elements: [bits('fan')],
      verdicts: [{ jump: { target: 'ownerless_app_fan' } }],
    });
  });

  it('replays nothing where it cannot matter: no conntrack, no global deny list, or no allow', () => {
    for (const yaml of [
      // No default deny anywhere: conntrack is off, connections carry no tag.
      'apps:\n  fan: {identity: {user: 1000}, rules: [{allow: [203.0.113.0/25]}]}\ndeny: [{to: [203.0.113.0/24]}]\n',
      // No global deny list.
      'apps:\n  fan: {identity: {user: 1000}, default: deny, rules: [{allow: [203.0.113.0/25]}]}\n',
      // No allow.
      'apps:\n  fan: {identity: {user: 1000}, default: deny, rules: [{deny: [203.0.113.0/25]}]}\ndeny: [{to: [203.0.113.0/24]}]\n',
    ]) {
      const compiled = compileYaml(yaml);
      expect(
        compiled.ruleset.chains.map((c) => c.name).filter((name) => name.startsWith('ownerless_app_')),
        yaml,
      ).toEqual([]);
      expect(
        compiled.ruleset.sets.map((set) => set.name),
        yaml,
      ).not.toContain('ownerless_tags');
      expect(renderText(compiled.ruleset), yaml).not.toContain('vmap @ownerless_tags');
    }
  });

  it('per-packet cost does not grow with names, addresses or apps', () => {
    const policyWith = (apps: number, networks: number, names: number) => {
      const nets = Array.from({ length: networks }, (_, i) => `10.${(i >> 8) & 255}.${i & 255}.0/24`);
      const hosts = Array.from({ length: names }, (_, i) => `h${i}.example.org`);
      const appYaml = Array.from(
        { length: apps },
        (_, i) => `  app${i}: {identity: {user: ${2000 + i}}, rules: [{allow: [${JSON.stringify(hosts[0] ?? 'x.example.org')}], ports: [443]}]}`,
      ).join('\n');
      return compileYaml(`deny:\n  - to: ${JSON.stringify([...nets, ...hosts])}\napps:\n${appYaml}\n`);
    };
    const small = policyWith(2, 2, 2);
    const large = policyWith(200, 5000, 5000);
    // The path one packet takes: the output chain, one app chain, the global deny chain.
    for (const name of ['output', 'app_app1', 'global_deny']) {
      expect(chain(large, name).rules.length, name).toBe(chain(small, name).rules.length);
    }
    // 5,000 networks of one length: one hash set, looked up under the /24 mask.
    const denySet = large.ruleset.sets.find((s) => s.name === 'g0_net4_p24')!;
    expect(denySet.elements).toHaveLength(5000);
    expect(denySet.flags).toEqual([]);
    expect(renderText(large.ruleset)).toContain('ip daddr & 255.255.255.0 @g0_net4_p24 counter');
    expect(large.ruleset.sets.find((s) => s.name === 'app_uid')!.elements).toHaveLength(200);
  });

  it('puts the big prefix lengths of a rule in hash sets (at most four), the rest in one interval set', () => {
    const nets = [
      ...Array.from({ length: 2000 }, (_, i) => `10.${i >> 8}.${i & 255}.0/24`),
      ...Array.from({ length: 1500 }, (_, i) => `172.16.${i >> 8}.${i & 255}`),
      ...Array.from({ length: 1100 }, (_, i) => `2001:db8:${i.toString(16)}::/48`),
      '192.168.0.0/16',
      '198.51.100.0/25',
      '2001:db8:ffff:1::/64',
    ];
    const compiled = compileYaml(`deny:\n  - to: ${JSON.stringify(nets)}\n`);
    const sets = new Map(compiled.ruleset.sets.map((s) => [s.name, s]));
    expect([...sets.keys()].sort()).toEqual(
      [
        'g0_net4',
        'g0_net4_p24',
        'g0_net4_p32',
        'g0_net6',
        'g0_net6_p48',
        // The log meters (per rule and uid) of the logging tails: routing header, DNS, the deny.
        `lograte_${sid(compiled, 'deny/f.yaml/0')}`,
        `lograte_${sid(compiled, 'dns/exclusive')}`,
        `lograte_${sid(compiled, 'routing-header')}`,
        'ports_53_853',
        'proto_igmp_ipv6_icmp',
        'proto_tcp_udp',
      ].sort(),
    );
    expect(sets.get('g0_net4')!.elements).toEqual([{ prefix: { addr: '192.168.0.0', len: 16 } }, { prefix: { addr: '198.51.100.0', len: 25 } }]);
    expect(sets.get('g0_net4')!.flags).toEqual(['interval']);
    expect(sets.get('g0_net4_p32')!.elements).toHaveLength(1500);
    const text = renderText(compiled.ruleset);
    expect(text).toContain('ip daddr @g0_net4_p32 counter goto log_g0');
    expect(text).toContain('ip6 daddr & ffff:ffff:ffff:: @g0_net6_p48 counter goto log_g0');
    // Five big lengths: the four largest get hash sets, the smallest stays with the intervals.
    const lengths: [number, (i: number) => string][] = [
      [32, (i) => `2007:${i.toString(16)}::/32`],
      [40, (i) => `2006:${i.toString(16)}::/40`],
      [48, (i) => `2003:1:${i.toString(16)}::/48`],
      [56, (i) => `2005:1:${i.toString(16)}::/56`],
      [64, (i) => `2004:1:1:${i.toString(16)}::/64`],
    ];
    const five = lengths.flatMap(([, net], k) => Array.from({ length: 1024 + k }, (_, i) => net(i)));
    // nft itself takes both forms, text and JSON (JSON as checked for the goldens: no cgroup rules here).
    if (!nftAvailable()) {
      expect(nftCheck(text)).toEqual({ ok: true, stderr: '' });
      expect(nftCheck(JSON.stringify(renderJson(compiled.ruleset)), { json: true })).toEqual({ ok: true, stderr: '' });
    }
    const capped = compileYaml(`deny:\n  - to: ${JSON.stringify(five)}\n`).ruleset.sets.map((set) => `${set.name}:${set.elements.length}`);
    // The log meters (routing header, DNS, the deny) start empty.
    expect(capped.filter((set) => set.startsWith('lograte_')).map((set) => set.replace(/^lograte_r[0-9a-f]{8}/, 'lograte'))).toEqual([
      'lograte:0',
      'lograte:0',
      'lograte:0',
    ]);
    expect(capped.filter((set) => !set.startsWith('lograte_')).sort()).toEqual([
      'g0_net6:1024',
      'g0_net6_p40:1025',
      'g0_net6_p48:1026',
      'g0_net6_p56:1027',
      'g0_net6_p64:1028',
      'ports_53_853:2',
      'proto_igmp_ipv6_icmp:2',
      'proto_tcp_udp:2',
    ]);
  });

  it('rules hold no anonymous sets: protocols and ports of several are named sets that rules with the same ones share', () => {
    const apps = Array.from(
      { length: 30 },
      (_, i) =>
        `  a${i}:\n    identity: {user: ${2000 + i}}\n    default: deny\n    rules:\n      - allow: [app${i}.example.org]\n        ports: [${i % 2 ? '443, 80' : '80, 443'}]\n      - allow: [192.0.2.${i}]\n        ports: [8000-8100, 22]\n        proto: tcp\n      - deny: any\n        proto: [udp, tcp, icmp]\n`,
    );
    const compiled = compileYaml(`apps:\n${apps.join('')}`);
    const text = renderText(compiled.ruleset);
    // The two ICMPv6 type sets of the link-local chain are the only anonymous ones, whatever the policy's size.
    // (`"set":[`: an anonymous set's elements; a log meter's `update` statement is `"set":{` and names its set.)
    const anonymous = compiled.ruleset.chains.flatMap((c) => c.rules.filter((r) => JSON.stringify(r.expr).includes('"set":[')).map(() => c.name));
    expect(anonymous).toEqual(['link_local', 'link_local']);
    const constants = compiled.ruleset.sets
      .filter((s) => s.key === 'inet_proto' || s.key === 'inet_service')
      .map((s) => ({ name: s.name, elements: s.elements, flags: s.flags }));
    expect(constants).toEqual([
      { name: 'proto_tcp_udp', elements: ['tcp', 'udp'], flags: [] },
      { name: 'ports_80_443', elements: [80, 443], flags: [] },
      { name: 'ports_22_8000to8100', elements: [22, { range: [8000, 8100] }], flags: ['interval'] },
      { name: 'proto_icmp_ipv6_icmp_tcp_udp', elements: ['icmp', 'ipv6-icmp', 'tcp', 'udp'], flags: [] },
      // The DNS rule's ports; its protocols are the policy's proto_tcp_udp above.
      { name: 'ports_53_853', elements: [53, 853], flags: [] },
      { name: 'proto_igmp_ipv6_icmp', elements: ['igmp', 'ipv6-icmp'], flags: [] },
    ]);
    // Default-deny apps: conntrack is on, and what an allow rule lets out is marked as the app's (its tag is the name's).
    const a1 = `ct mark set ct mark & 0x0000ffff | ${markValue(appTags(Array.from({ length: 30 }, (_, i) => `a${i}`)).get('a1')!)}`;
    expect(ruleText(chain(compiled, 'app_a1').rules[0]!)).toBe(
      `ip daddr @a_a1_0_dns4 meta l4proto @proto_tcp_udp th dport @ports_80_443 counter ${a1} accept comment "${sid(compiled, 'app/a1/0')} f.yaml:17 app/a1/0"`,
    );
    expect(ruleText(chain(compiled, 'app_a1').rules[2]!)).toBe(
      `ip daddr @a_a1_1_net4 meta l4proto tcp th dport @ports_22_8000to8100 counter ${a1} accept comment "${sid(compiled, 'app/a1/1')} f.yaml:19 app/a1/1"`,
    );
    expect(text).toContain('elements = { icmp, ipv6-icmp, tcp, udp }');
    // Ports repeated, overlapping or adjacent are joined: nft refuses overlapping intervals in a named set.
    const joined = compileYaml(
      'apps:\n  j:\n    identity: {user: 7}\n    rules:\n      - allow: any\n        ports: [8080, "8000-8100", 53, 53, "8101-8200"]\n      - allow: any\n        ports: ["8000-8100", 8050]\n',
    );
    expect(joined.ruleset.sets.filter((s) => s.key === 'inet_service').map((s) => ({ name: s.name, elements: s.elements }))).toEqual([
      { name: 'ports_53_8000to8200', elements: [53, { range: [8000, 8200] }] },
      { name: 'ports_53_853', elements: [53, 853] },
    ]);
    expect(ruleText(chain(joined, 'app_j').rules[1]!)).toBe(
      `meta l4proto @proto_tcp_udp th dport 8000-8100 counter accept comment "${sid(joined, 'app/j/1')} f.yaml:7 app/j/1"`,
    );
    expect(text).toContain(
      `ct state established,related ct mark & 0xffff0000 ${markValue(appTags(Array.from({ length: 30 }, (_, i) => `a${i}`)).get('a1')!)} accept`,
    );
    if (!nftAvailable()) {
      expect(nftCheck(text)).toEqual({ ok: true, stderr: '' });
      expect(nftCheck(JSON.stringify(renderJson(compiled.ruleset)), { json: true })).toEqual({ ok: true, stderr: '' });
    }
  });

  it('names compile to timeout sets the resolver fills, bound to the rule', () => {
    const compiled = compileYaml('lists: {l: {names: [a.example]}}\ndeny:\n  - to: [x.example.org, "*.y.example.org", "@l"]\n');
    expect(compiled.dnsBindings).toEqual([
      {
        ruleId: 'deny/f.yaml/0',
        verdict: 'deny',
        names: ['x.example.org'],
        suffixes: ['y.example.org'],
        lists: ['l'],
        set4: 'g0_dns4',
        set6: 'g0_dns6',
        sharedAddresses: 'deny',
      },
    ]);
    for (const name of ['g0_dns4', 'g0_dns6']) {
      expect(compiled.ruleset.sets.find((s) => s.name === name)).toMatchObject({ flags: ['timeout'], elements: [] });
    }
  });

  it('a logging deny jumps to a chain where the rate limit only thins the log, never the drop', () => {
    const compiled = compileYaml('defaults: {log: {rate: 3/minute, burst: 2, group: 9}}\ndeny:\n  - to: [192.0.2.0/24]\n');
    const rules = chain(compiled, 'global_deny').rules.map(ruleText);
    const id = sid(compiled, 'deny/f.yaml/0');
    expect(rules).toEqual([`ip daddr @g0_net4 counter goto log_g0 comment "${id} f.yaml:3 deny/f.yaml/0"`]);
    expect(chain(compiled, 'log_g0').rules.map(ruleText)).toEqual([
      `update @lograte_${id} { meta skuid limit rate 3/minute burst 2 packets } log prefix "egd ${id} " group 9 counter drop comment "${id} f.yaml:3 deny/f.yaml/0"`,
      `meta skuid 0-4294967295 counter drop comment "${id} f.yaml:3 deny/f.yaml/0"`,
      `limit rate 3/minute burst 2 packets log prefix "egd ${id} " group 9 comment "${id} f.yaml:3 deny/f.yaml/0"`,
      `counter drop comment "${id} f.yaml:3 deny/f.yaml/0"`,
    ]);
  });

  it('log: false and denials: false drop without logging', () => {
    const quiet = compileYaml('deny:\n  - to: [192.0.2.0/24]\n    log: false\n');
    expect(chain(quiet, 'global_deny').rules.map(ruleText)).toEqual([
      `ip daddr @g0_net4 counter drop comment "${sid(quiet, 'deny/f.yaml/0')} f.yaml:2 deny/f.yaml/0"`,
    ]);
    const off = compileYaml('defaults: {egress: deny, log: {denials: false}}\n');
    expect(renderText(off.ruleset)).not.toContain('log prefix');
  });

  it('every rule comment ends in a fingerprint of the rule, and the first rule carries the policy digest', () => {
    const a = compileYaml('deny:\n  - to: [192.0.2.0/24]\n    ports: [25]\n');
    const b = compileYaml('deny:\n  - to: [192.0.2.0/24]\n    ports: [26]\n');
    const fingerprint = (c: typeof a) => chain(c, 'global_deny').rules[0]!.comment!.match(/ #([0-9a-f]{8})$/)![1];
    expect(fingerprint(a)).not.toBe(fingerprint(b));
    for (const c of a.ruleset.chains) for (const r of c.rules) expect(r.comment).toMatch(/ #[0-9a-f]{8}$/);
    // The routing-header drop comes first (see its own test); the loopback rule, always there, carries the digest.
    const loopback = (c: typeof a) => chain(c, 'output').rules.find((r) => ruleText(r).startsWith('meta oif "lo" accept'))!;
    expect(chain(a, 'output').rules.indexOf(loopback(a))).toBe(1);
    expect(loopback(a).comment).toMatch(/^loopback; policy sha256:[0-9a-f]{32} #[0-9a-f]{8}$/);
    expect(loopback(a).comment).not.toBe(loopback(b).comment);
  });

  it('every rule of every policy chain names its file:line and rule id', () => {
    const compiled = compileYaml('apps: {a: {identity: {user: alice}, default: deny, rules: [{deny: [192.0.2.1]}, {allow: any, proto: icmp}]}}\n');
    for (const name of ['app_a', 'log_a_a_0']) {
      for (const r of chain(compiled, name).rules) {
        const named =
          /^(?:(r[0-9a-f]{8}) )?f\.yaml:\d+ (app\/a\/(\d|default)|app\/a: then the global deny list|app\/a\/default: (its own established and related connections|answers on connections that came in, claimed|answers from a socket not yet full, unclaimed)) #[0-9a-f]{8}$/.exec(
            r.comment ?? '',
          );
        expect(named, r.comment).not.toBeNull();
        // Every rule that decides for a policy rule starts with that rule's short id; the jump to the global deny list decides nothing.
        const ruleId = named![2]!.replace(/:.*$/, '');
        expect(named![1], r.comment).toBe(ruleId === 'app/a' ? undefined : sid(compiled, ruleId));
      }
    }
  });

  it('fills cgroup maps from the cgroups that exist, and reports a cgroup two owners claim', () => {
    const compiled = compileYaml('apps:\n  a: {identity: {unit: a.service}}\n  any: {identity: {cgroup: "system.slice/*.service"}}\n');
    const map = compiled.ruleset.sets.find((s) => s.name === 'app_cg_l2')!;
    expect(map.elements).toEqual(['system.slice/a.service', 'system.slice/b.service', 'system.slice/gpg.service']);
    expect(map.verdicts).toEqual([{ goto: { target: 'app_a' } }, { goto: { target: 'app_any' } }, { goto: { target: 'app_any' } }]);
    expect(compiled.warnings.map((w) => w.message)).toEqual(['cgroup system.slice/a.service matches both app a and app any; app a keeps it']);
    expect(compiled.cgroupBindings.map((b) => `${b.glob}@${b.level}→${b.map}`)).toEqual([
      'system.slice/a.service@2→app_cg_l2',
      'system.slice/*.service@2→app_cg_l2',
    ]);
  });

  it("a Flatpak selector claims its app's scopes, not those of an app whose id merely starts the same", () => {
    const base = 'user.slice/user-1000.slice/user@1000.service/app.slice';
    const cgroups = [`${base}/app-flatpak-org.foo.Bar-123.scope`, `${base}/app-flatpak-org.foo.Bar-beta-456.scope`];
    const compiled = compileYaml('apps: {bar: {identity: {flatpak: org.foo.Bar}}}\n', { facts: { ...FACTS, cgroups } });
    expect(compiled.ruleset.sets.find((s) => s.name === 'app_cg_l5')!.elements).toEqual([cgroups[0]]);
  });

  it('an unknown user of an app is a warning naming the app and matches nothing; an unknown Tor user marked optional means Tor gets no exception', () => {
    const compiled = compileYaml('apps: {a: {identity: {user: nobody-here}}}\ntor: {enabled: true, user: {user: no-tor-user, optional: true}}\n');
    expect(compiled.errors).toEqual([]);
    expect(compiled.warnings.map((w) => w.message)).toEqual([
      `Tor's user "no-tor-user" does not exist on this machine; its rules match nothing until it does`,
      'user "nobody-here" of app a does not exist on this machine; its rules match nothing until it does',
    ]);
    expect(compiled.ruleset.sets.find((s) => s.name === 'app_uid')).toBeUndefined();
    // No exception for Tor's user (the resolver's root-only DNS exception is another rule).
    expect(
      renderText(compiled.ruleset)
        .split('\n')
        .filter((line) => /skuid \d+ counter accept/.test(line) && !line.includes('dns/resolver')),
    ).toEqual([]);
  });

  it('Tor: updaters reach only the SOCKS address; a non-loopback gateway gets its own accept', () => {
    const local = compileYaml('identities: {apt: {user: _apt}}\ntor: {enabled: true, updaters: [apt]}\n');
    const updaters = sid(local, 'tor/updaters');
    expect(chain(local, 'tor_updaters').rules.map(ruleText)).toEqual([
      `meta oif "lo" ip daddr 127.0.0.1 tcp dport 9050 accept comment "${sid(local, 'tor/socks')} f.yaml:2 tor/socks"`,
      `update @lograte_${updaters} { meta skuid limit rate 10/second burst 20 packets } log prefix "egd ${updaters} " group 7745 counter drop comment "${updaters} f.yaml:2 tor/updaters"`,
      `meta skuid 0-4294967295 counter drop comment "${updaters} f.yaml:2 tor/updaters"`,
      `limit rate 10/second burst 20 packets log prefix "egd ${updaters} " group 7745 comment "${updaters} f.yaml:2 tor/updaters"`,
      `counter drop comment "${updaters} f.yaml:2 tor/updaters"`,
    ]);
    // A gateway is network: system domains and lockdown come before it.
    const gateway = compileYaml(
      'identities: {apt: {user: _apt}}\nsystemDomains: {off: {members: [{user: vault}]}}\ntor: {enabled: true, socks: "[2001:db8::9]:9150", updaters: [apt]}\n',
      { lockdown: true },
    );
    expect(chain(gateway, 'tor_updaters').rules.map(ruleText).slice(0, 3)).toEqual([
      'meta skuid vmap @sd_uid comment "system domains by uid"',
      'goto lockdown comment "lockdown is on"',
      `ip6 daddr 2001:db8::9 tcp dport 9150 accept comment "${sid(gateway, 'tor/socks')} f.yaml:3 tor/socks"`,
    ]);
  });

  it('ids are unique across files whose names differ only in extension or punctuation', () => {
    const policy = resolvePolicy(
      [
        { file: 'a.yaml', bytes: new TextEncoder().encode('deny:\n  - to: [203.0.113.0/24]\n    ports: [443]\n') },
        { file: 'a.yml', bytes: new TextEncoder().encode('deny:\n  - to: [198.51.100.0/24]\n') },
      ],
      () => ({ error: 'none' }),
    );
    if (!policy.ok) throw new Error('invalid');
    const compiled = compile(policy.policy, FACTS);
    expect(compiled.ruleset.sets.filter((s) => s.key === 'ipv4_addr' && s.flags.includes('interval')).map((s) => [s.name, s.elements])).toEqual([
      ['g0_net4', [{ prefix: { addr: '203.0.113.0', len: 24 } }]],
      ['g1_net4', [{ prefix: { addr: '198.51.100.0', len: 24 } }]],
    ]);
    expect(policy.policy.globalDeny.map((r) => r.id)).toEqual(['deny/a.yaml/0', 'deny/a.yml/0']);
  });

  it('leaves out a cgroup whose name nft cannot carry, instead of failing the whole table', () => {
    const cgroups = ['system.slice/ok.service', 'system.slice/x"y.service', 'system.slice/fsck\\x2droot.service'];
    const compiled = compileYaml('apps: {a: {identity: {cgroup: "system.slice/*"}}}\n', { facts: { ...FACTS, cgroups } });
    expect(compiled.ruleset.sets.find((s) => s.name === 'app_cg_l2')!.elements).toEqual([cgroups[0], cgroups[2]]);
    expect(compiled.warnings.map((w) => w.message)).toEqual([`cgroup ${JSON.stringify(cgroups[1])} has a name nftables cannot carry; it is left out`]);
    expect(renderText(compiled.ruleset)).toContain(`"${cgroups[2]}" : goto app_a`);
  });

  it('cuts off the nearest nameable ancestor of a deny-side member nft cannot name, and only leaves out an allow-side one', () => {
    const unnamedCgroups = [{ path: 'u/app-\ufffd.scope', shown: '"u/app-\\xff.scope"', namedAncestor: 'u' }];
    const facts = { ...FACTS, cgroups: ['u', 'u/app-ok.scope'], unnamedCgroups };
    const deny = compileYaml('apps: {a: {identity: {cgroup: "u/app-*"}, default: deny}}\n', { facts });
    expect(deny.ruleset.sets.find((s) => s.name === 'app_cg_l2')!.elements).toEqual(['u/app-ok.scope']);
    expect(deny.ruleset.sets.find((s) => s.name === 'app_cg_l1')!.elements).toEqual(['u']);
    expect(renderText(deny.ruleset)).toContain('"u" : goto cut_app_a');
    expect(deny.ruleset.chains.find((c) => c.name === 'cut_app_a')!.rules.at(-1)!.expr).toContainEqual({ drop: null });
    expect(deny.warnings.map((w) => w.message)).toEqual([
      'cgroup "u/app-\\xff.scope" of app a has a name nftables cannot carry; what its ancestor u holds is cut off instead, but for members named below it',
    ]);
    const domain = compileYaml('systemDomains: {off: {members: [{cgroup: "u/app-*"}]}}\n', { facts });
    expect(renderText(domain.ruleset)).toContain('"u" : goto sd_off');
    const allow = compileYaml('apps: {a: {identity: {cgroup: "u/app-*"}}}\n', { facts });
    expect(allow.ruleset.sets.map((s) => s.name)).toEqual([
      `lograte_${sid(allow, 'routing-header')}`,
      `lograte_${sid(allow, 'dns/exclusive')}`,
      'app_cg_l2',
      'proto_tcp_udp',
      'ports_53_853',
      'proto_igmp_ipv6_icmp',
    ]);
    expect(allow.warnings.map((w) => w.message)).toEqual(['cgroup "u/app-\\xff.scope" has a name nftables cannot carry; it is left out']);
    const orphan = compileYaml('systemDomains: {off: {members: [{cgroup: "x*"}]}}\n', {
      facts: { ...FACTS, cgroups: [], unnamedCgroups: [{ path: 'x\ufffd', shown: '"x\\xff"', namedAncestor: '' }] },
    });
    expect(orphan.errors.map((e) => e.message)).toEqual(['cgroup "x\\xff" of system domain off has a name nftables cannot carry, and so has every ancestor']);
  });

  it('cuts comments and log prefixes in bytes, so long non-ASCII text still loads', () => {
    expect(Buffer.byteLength(safeText('é'.repeat(100), 128))).toBeLessThanOrEqual(128);
    expect(safeText('é'.repeat(100), 128)).toMatch(/^é+\.\.\.$/);
    expect(safeText('a"b\\c\nd', 128)).toBe("a'b'c'd");
  });

  it.skipIf(nftAvailable())('random policies render to nft text the real nft accepts', () => {
    fc.assert(
      fc.property(arbPolicy, ({ yaml, lockdown }) => {
        const compiled = compile(policyFrom(yaml), GEN_FACTS, { lockdown });
        const result = nftCheck(renderText(compiled.ruleset), { cgroups: GEN_FACTS.cgroups });
        expect(result.stderr).toBe('');
      }),
      { numRuns: 12 },
    );
  });
});
