import { describe, expect, it } from 'vitest';
import { appTags, DEFAULT_TAG } from '../../src/compile/ct-mark.js';
import { compileYaml, FACTS } from '../support/compile-text.js';
import { evaluate, type Packet } from '../support/ruleset-interpreter.js';

/** The test interpreter on the parts of the table random policies seldom reach. */
const packet = (over: Partial<Packet>): Packet => ({
  oif: 'eth0',
  family: 4,
  daddr: '192.0.2.9',
  l4proto: 'tcp',
  dport: 443,
  skuid: 65534,
  skgid: 65534,
  cgroup: '',
  ct: 'new',
  ...over,
});

describe('ruleset interpreter', () => {
  it('looks up masked destinations in the hash sets of big lists, and the rest in the interval set', () => {
    const nets = [
      ...Array.from({ length: 1100 }, (_, i) => `10.${i >> 8}.${i & 255}.0/24`),
      '198.51.100.0/25',
      ...Array.from({ length: 1030 }, (_, i) => `2001:db8:${i.toString(16)}::/48`),
    ];
    const { ruleset } = compileYaml(`deny:\n  - to: ${JSON.stringify(nets)}\n`);
    expect(JSON.stringify(ruleset.chains)).toContain('"&"');
    expect(evaluate(ruleset, packet({ daddr: '10.4.75.200' })).verdict).toBe('drop');
    expect(evaluate(ruleset, packet({ daddr: '10.4.76.1' })).verdict).toBe('accept');
    expect(evaluate(ruleset, packet({ daddr: '198.51.100.127' })).verdict).toBe('drop');
    expect(evaluate(ruleset, packet({ daddr: '198.51.100.128' })).verdict).toBe('accept');
    expect(evaluate(ruleset, packet({ family: 6, daddr: '2001:db8:405:ffff::1' })).verdict).toBe('drop');
    expect(evaluate(ruleset, packet({ family: 6, daddr: '2001:db8:406::1' })).verdict).toBe('accept');
  });

  it('follows verdict maps by cgroup ancestor, uid and gid, jump and return, and the default tail', () => {
    const facts = { ...FACTS, cgroups: ['system.slice', 'system.slice/a.service'] };
    const { ruleset } = compileYaml(
      'defaults: {egress: deny}\napps:\n  a: {identity: {unit: a.service}, rules: [{allow: [192.0.2.0/24], ports: [443]}]}\n  w: {identity: {group: wheel}, default: allow}\ndeny:\n  - to: [192.0.2.128/25]\n',
      { facts },
    );
    const a = packet({ cgroup: 'system.slice/a.service/worker' });
    expect(evaluate(ruleset, a)).toMatchObject({ verdict: 'accept', chain: 'app_a' });
    expect(evaluate(ruleset, { ...a, dport: 80, daddr: '192.0.2.200' })).toMatchObject({
      verdict: 'drop',
      // An app chosen by cgroup meets its own copy of the list (rule-ids.ts, appsWithOwnGlobalDeny).
      chain: 'log_g0_global_deny_app_a',
      path: ['output', 'app_a', 'global_deny_app_a', 'log_g0_global_deny_app_a'],
    });
    expect(evaluate(ruleset, { ...a, dport: 80, daddr: '192.0.2.9' })).toMatchObject({ verdict: 'drop', chain: 'app_a' });
    expect(evaluate(ruleset, packet({ cgroup: 'system.slice' }))).toMatchObject({ verdict: 'drop', chain: 'output' });
    expect(evaluate(ruleset, packet({ skgid: 10, daddr: '198.51.100.1' }))).toMatchObject({
      verdict: 'accept',
      chain: 'app_w',
      path: ['output', 'app_w', 'global_deny'],
    });
    // Packets of connections already let out (their mark names the global default) pass the default deny, not the explicit ones.
    const own = DEFAULT_TAG * 0x10000;
    expect(evaluate(ruleset, packet({ ct: 'established', ctMark: own, daddr: '198.51.100.1' })).verdict).toBe('accept');
    expect(evaluate(ruleset, packet({ ct: 'established', ctMark: own, daddr: '192.0.2.200' })).verdict).toBe('drop');
  });

  it("passes a default deny's established packets only on connections marked as that identity's", () => {
    const facts = { ...FACTS, cgroups: ['system.slice', 'system.slice/a.service', 'system.slice/b.service'] };
    const { ruleset } = compileYaml(
      'defaults: {egress: deny}\napps:\n  a: {identity: {unit: a.service}, rules: [{allow: [192.0.2.0/24], ports: [53], proto: udp}]}\n  b: {identity: {unit: b.service}}\n  c: {identity: {user: alice}, default: allow}\ndns: {exclusive: false}\n',
      { facts },
    );
    const tags = appTags(['a', 'b', 'c']);
    const mark = (tag: number, low = 0) => tag * 0x10000 + low;
    const a = packet({ cgroup: 'system.slice/a.service', l4proto: 'udp', dport: 53, daddr: '192.0.2.53' });
    const b = { ...a, cgroup: 'system.slice/b.service' };
    const nobody = { ...a, cgroup: 'user.slice' };
    // a opens the flow: its allow rule writes a's tag, keeping the low 16 bits other software owns.
    expect(evaluate(ruleset, { ...a, ctMark: 0x1234 })).toMatchObject({ verdict: 'accept', chain: 'app_a', ctMark: mark(tags.get('a')!, 0x1234) });
    const aFlow = { ct: 'established' as const, ctMark: mark(tags.get('a')!, 0x1234) };
    // b (default deny, no rule) and a process of the global default (deny) send on a's entry: dropped.
    expect(evaluate(ruleset, { ...b, ...aFlow })).toMatchObject({ verdict: 'drop', chain: 'app_b' });
    expect(evaluate(ruleset, { ...nobody, ...aFlow })).toMatchObject({ verdict: 'drop', chain: 'output' });
    // The same, as the answer on a connection that came in and a answered first.
    expect(evaluate(ruleset, { ...b, ...aFlow, ctDirection: 'reply' })).toMatchObject({ verdict: 'drop', chain: 'app_b' });
    // b's own connections pass its default deny; so do answers on a connection that came in, which b's first answer claims.
    expect(evaluate(ruleset, { ...b, ct: 'established', ctMark: mark(tags.get('b')!, 7) })).toMatchObject({ verdict: 'accept', chain: 'app_b' });
    expect(evaluate(ruleset, { ...b, ct: 'established', ctDirection: 'reply', ctMark: 7 })).toMatchObject({
      verdict: 'accept',
      chain: 'app_b',
      ctMark: mark(tags.get('b')!, 7),
    });
    // A connection opened before a marking table (mark 0, outbound) is new to the default deny: it passes only where a rule allows it, which makes it the app's.
    expect(evaluate(ruleset, { ...b, ct: 'established' })).toMatchObject({ verdict: 'drop', chain: 'app_b' });
    expect(evaluate(ruleset, { ...a, ct: 'established' })).toMatchObject({ verdict: 'accept', ctMark: mark(tags.get('a')!) });
    // A default allow writes its identity's tag too, so a later switch to deny keeps the connection its own.
    expect(evaluate(ruleset, packet({ skuid: 1000, daddr: '198.51.100.1' }))).toMatchObject({
      verdict: 'accept',
      chain: 'app_c',
      ctMark: mark(tags.get('c')!),
    });
    // Packets without an owner (an orphaned socket of an app found by uid, the kernel's resets) pass the global default on an established connection, any mark.
    const { skuid: _uid, skgid: _gid, ...ownerless } = packet({ ct: 'established', ctMark: mark(tags.get('c')!), daddr: '198.51.100.1' });
    expect(evaluate(ruleset, ownerless)).toMatchObject({ verdict: 'accept', chain: 'ownerless' });
    expect(evaluate(ruleset, { ...ownerless, ct: 'new' })).toMatchObject({ verdict: 'drop', chain: 'output' });
    expect(evaluate(ruleset, packet({ ct: 'established', ctMark: mark(tags.get('c')!), daddr: '198.51.100.1' }))).toMatchObject({
      verdict: 'drop',
      chain: 'output',
    });
  });

  it('lets ICMPv6 neighbour discovery out, and an echo request only where the policy allows', () => {
    const { ruleset } = compileYaml('defaults: {egress: deny}\nsystemDomains: {off: {members: [{user: vault}]}}\n');
    // Sent by the kernel on nobody's behalf: no socket, so no owner.
    const {
      skuid: _uid,
      skgid: _gid,
      ...kernelSent
    } = packet({ family: 6, daddr: 'ff02::1:ff00:2', l4proto: 'ipv6-icmp', icmpv6Type: 'nd-neighbor-solicit', hoplimit: 255 });
    expect(evaluate(ruleset, kernelSent)).toMatchObject({ verdict: 'accept', chain: 'link_local' });
    expect(evaluate(ruleset, { ...kernelSent, hoplimit: 64 })).toMatchObject({ verdict: 'drop', chain: 'output' });
    expect(evaluate(ruleset, { ...kernelSent, icmpv6Type: 'echo-request', daddr: '2001:db8::2' })).toMatchObject({ verdict: 'drop', chain: 'output' });
    // A system domain's own ND-typed packets stop at its dispatch, before the link-local exception.
    expect(evaluate(ruleset, { ...kernelSent, skuid: 990 })).toMatchObject({ verdict: 'drop', chain: 'sd_off' });
    // A process's own ND-typed packet (a raw socket), to an off-link address: its identity decides, not the link exception.
    const raw = { ...kernelSent, daddr: '2001:db8:1::1', skuid: 1000, skgid: 1000 };
    expect(evaluate(ruleset, raw)).toMatchObject({ verdict: 'drop', chain: 'output', path: ['output', 'link_local', 'global_deny'] });
    expect(evaluate(ruleset, { ...raw, daddr: 'ff02::1:ff00:2' })).toMatchObject({ verdict: 'drop', chain: 'output' });
    // An ip6 packet to an IPv4-mapped address is not IPv4: `ip daddr` never sees it.
    const v4deny = compileYaml('deny:\n  - to: [192.0.2.0/24]\n').ruleset;
    expect(evaluate(v4deny, packet({ daddr: '192.0.2.5' })).verdict).toBe('drop');
    expect(evaluate(v4deny, packet({ family: 6, daddr: '::ffff:192.0.2.5' })).verdict).toBe('accept');
  });

  it("lets the kernel's MLD reports out only outside lockdown, and hands a process's ICMPv6 and IGMP to its identity", () => {
    const policy = 'defaults: {egress: allow}\napps:\n  a: {identity: {user: alice}, default: deny}\ntor: {enabled: true}\n';
    const free = compileYaml(policy).ruleset;
    const locked = compileYaml(policy, { lockdown: true }).ruleset;
    const { skuid: _uid, skgid: _gid, ...unowned } = packet({});
    const mld = { ...unowned, family: 6 as const, daddr: 'ff02::16', l4proto: 'ipv6-icmp' as const, icmpv6Type: 'mld2-listener-report', hoplimit: 1 };
    const nd = { ...unowned, family: 6 as const, daddr: '2001:db8::2', l4proto: 'ipv6-icmp' as const, icmpv6Type: 'nd-neighbor-solicit', hoplimit: 255 };
    const igmp = { ...unowned, daddr: '224.0.0.22', l4proto: 'igmp' as const };
    expect(evaluate(free, mld)).toMatchObject({ verdict: 'accept', chain: 'mld_reports' });
    expect(evaluate(locked, mld)).toMatchObject({ verdict: 'drop', chain: 'lockdown' });
    // ND the kernel sends passes under lockdown too: Tor over IPv6 needs it.
    expect(evaluate(free, nd)).toMatchObject({ verdict: 'accept', chain: 'link_local' });
    expect(evaluate(locked, nd)).toMatchObject({ verdict: 'accept', chain: 'link_local' });
    // The kernel's IGMP reports, within their rate, meet the rules below: here the default allow; the kill switch under lockdown.
    expect(evaluate(free, igmp)).toMatchObject({ verdict: 'accept', chain: 'output', path: ['output', 'link_local', 'igmp_reports', 'global_deny'] });
    expect(evaluate(locked, igmp)).toMatchObject({ verdict: 'drop', chain: 'lockdown' });
    // A process's MLD, ND or IGMP: its app's default deny, or the kill switch.
    for (const p of [mld, nd, igmp]) {
      expect(evaluate(free, { ...p, skuid: 1000, skgid: 1000 }), p.l4proto).toMatchObject({ verdict: 'drop', chain: 'app_a' });
      expect(evaluate(locked, { ...p, skuid: 1000, skgid: 1000 }), p.l4proto).toMatchObject({ verdict: 'drop', chain: 'lockdown' });
    }
    // Tor's own ND-typed packets pass under lockdown as the rest of its traffic does.
    expect(evaluate(locked, { ...nd, skuid: 110, skgid: 110 })).toMatchObject({ verdict: 'accept', chain: 'output' });
  });
});
