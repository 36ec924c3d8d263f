import { describe, expect, it } from 'vitest';
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
      chain: 'log_g0',
      path: ['output', 'app_a', 'global_deny', 'log_g0'],
    });
    expect(evaluate(ruleset, { ...a, dport: 80, daddr: '192.0.2.9' })).toMatchObject({ verdict: 'drop', chain: 'app_a' });
    expect(evaluate(ruleset, packet({ cgroup: 'system.slice' }))).toMatchObject({ verdict: 'drop', chain: 'output' });
    expect(evaluate(ruleset, packet({ skgid: 10, daddr: '198.51.100.1' }))).toMatchObject({
      verdict: 'accept',
      chain: 'app_w',
      path: ['output', 'app_w', 'global_deny'],
    });
    // Packets of connections already let out pass the default deny, not the explicit ones.
    expect(evaluate(ruleset, packet({ ct: 'established', daddr: '198.51.100.1' })).verdict).toBe('accept');
    expect(evaluate(ruleset, packet({ ct: 'established', daddr: '192.0.2.200' })).verdict).toBe('drop');
  });

  it('lets ICMPv6 neighbour discovery out, and an echo request only where the policy allows', () => {
    const { ruleset } = compileYaml('defaults: {egress: deny}\nsystemDomains: {off: {members: [{user: vault}]}}\n');
    // Sent by the kernel on nobody's behalf: no socket, so no owner.
    const {
      skuid: _uid,
      skgid: _gid,
      ...kernelSent
    } = packet({ family: 6, daddr: 'ff02::1:ff00:2', l4proto: 'ipv6-icmp', icmpv6Type: 'nd-neighbor-solicit', hoplimit: 255 });
    expect(evaluate(ruleset, kernelSent)).toMatchObject({ verdict: 'accept', chain: 'icmpv6_link' });
    expect(evaluate(ruleset, { ...kernelSent, hoplimit: 64 })).toMatchObject({ verdict: 'drop', chain: 'output' });
    expect(evaluate(ruleset, { ...kernelSent, icmpv6Type: 'echo-request', daddr: '2001:db8::2' })).toMatchObject({ verdict: 'drop', chain: 'output' });
    // A system domain's own ND-typed packets stop at its dispatch, before the link-local exception.
    expect(evaluate(ruleset, { ...kernelSent, skuid: 990 })).toMatchObject({ verdict: 'drop', chain: 'sd_off' });
    // An ip6 packet to an IPv4-mapped address is not IPv4: `ip daddr` never sees it.
    const v4deny = compileYaml('deny:\n  - to: [192.0.2.0/24]\n').ruleset;
    expect(evaluate(v4deny, packet({ daddr: '192.0.2.5' })).verdict).toBe('drop');
    expect(evaluate(v4deny, packet({ family: 6, daddr: '::ffff:192.0.2.5' })).verdict).toBe('accept');
  });
});
