import { describe, expect, it } from 'vitest';
import type { Facts } from '../../src/compile/compile.js';
import { explain } from '../../src/compile/explain.js';
import { renderText, type SetDecl } from '../../src/compile/ruleset.js';
import { compileYaml, FACTS, policyFrom } from '../support/compile-text.js';
import { nftAvailable, nftCheck } from '../support/nft-check.js';
import { evaluate } from '../support/ruleset-interpreter.js';

/**
 * Identities that cannot be left by changing ids (issue 17, findings 4 and
 * 5): a user holds its subordinate ranges, a group holds its members.
 */
const facts: Facts = {
  ...FACTS,
  groups: new Map([...FACTS.groups, ['staff', 50]]),
  subordinate: new Map([
    [1000, { uids: [{ from: 100000, to: 165535 }], gids: [{ from: 100000, to: 165535 }] }],
    [990, { uids: [{ from: 165000, to: 170000 }], gids: [] }],
  ]),
  members: new Map([
    [10, [1000, 4000]],
    [50, [4000, 4001]],
  ]),
};

const map = (compiled: ReturnType<typeof compileYaml>, name: string): SetDecl => {
  const found = compiled.ruleset.sets.find((s) => s.name === name);
  if (!found) throw new Error(`no map ${name}`);
  return found;
};
/** A map's entries as `key: target`, for reading. */
const entries = (set: SetDecl): string[] =>
  set.elements.map((e, i) => {
    const v = set.verdicts![i]!;
    const target = 'goto' in v ? v.goto.target : JSON.stringify(v);
    return `${typeof e === 'object' && 'range' in e ? `${e.range[0]}-${e.range[1]}` : JSON.stringify(e)}: ${target}`;
  });

describe('subordinate ids and group members', () => {
  it("a user's subordinate uid and gid ranges join its identity, in an interval map; a map without a range stays a hash", () => {
    const compiled = compileYaml('systemDomains: {off: {members: [{user: alice}]}}\napps: {a: {identity: [{user: vault}]}}\n', { facts });
    expect(entries(map(compiled, 'sd_uid'))).toEqual(['1000: sd_off', '100000-165535: sd_off']);
    expect(map(compiled, 'sd_uid').flags).toEqual(['interval']);
    expect(entries(map(compiled, 'sd_gid'))).toEqual(['100000-165535: sd_off']);
    expect(map(compiled, 'sd_gid').flags).toEqual(['interval']);
    // vault's range overlaps nothing in its own dispatch: a dispatch is on its own.
    expect(entries(map(compiled, 'app_uid'))).toEqual(['990: app_a', '165000-170000: app_a']);
    const plain = compileYaml('systemDomains: {off: {members: [{user: _apt}]}}\n', { facts });
    expect(map(plain, 'sd_uid').flags).toEqual([]);
    expect(compiled.errors).toEqual([]);
  });

  it("a group's members (primary or supplementary) join its identity by uid, and its gid stays", () => {
    const compiled = compileYaml('systemDomains: {off: {members: [{group: staff}]}}\n', { facts });
    expect(entries(map(compiled, 'sd_uid'))).toEqual(['4000: sd_off', '4001: sd_off']);
    expect(map(compiled, 'sd_uid').flags).toEqual([]);
    expect(entries(map(compiled, 'sd_gid'))).toEqual(['50: sd_off']);
  });

  it("a group's members bring their subordinate uid and gid ranges: a member's rootless container is still the member", () => {
    // wheel's member alice (1000) has subordinate ranges; its member 4000 has none.
    const compiled = compileYaml('defaults: {egress: allow}\nsystemDomains: {off: {members: [{group: wheel}]}}\n', { facts });
    expect(entries(map(compiled, 'sd_uid'))).toEqual(['1000: sd_off', '4000: sd_off', '100000-165535: sd_off']);
    expect(map(compiled, 'sd_uid').flags).toEqual(['interval']);
    expect(entries(map(compiled, 'sd_gid'))).toEqual(['10: sd_off', '100000-165535: sd_off']);
    expect([compiled.errors, compiled.warnings]).toEqual([[], []]);
    // The kernel's verdict: as `unshare --user --map-auto` and `setpriv --reuid=1` send, from host uid 100000 on.
    const packet = { oif: 'eth0', family: 4, daddr: '192.0.2.1', l4proto: 'tcp', dport: 443, cgroup: '', ct: 'new' } as const;
    for (const ids of [
      { skuid: 100000, skgid: 100000 },
      { skuid: 165535, skgid: 4242 },
      // A subordinate gid alone, with a uid of nobody's.
      { skuid: 4242, skgid: 100009 },
    ])
      expect(evaluate(compiled.ruleset, { ...packet, ...ids }), JSON.stringify(ids)).toMatchObject({ verdict: 'drop', chain: 'sd_off' });
    expect(evaluate(compiled.ruleset, { ...packet, skuid: 165536, skgid: 4242 })).toMatchObject({ verdict: 'accept' });
    // explain says what the kernel does.
    const policy = policyFrom('defaults: {egress: allow}\nsystemDomains: {off: {members: [{group: wheel}]}}\n');
    const ask = (who: Parameters<typeof explain>[1]['who']) => {
      const answer = explain(policy, { who, host: '192.0.2.1', port: 443, proto: 'tcp' }, facts);
      return 'error' in answer ? answer.error : `${answer.verdict} ${answer.level}`;
    };
    expect(ask({ kind: 'user', user: 100000 })).toBe('deny system-domain');
    expect(ask({ kind: 'group', group: 100009 })).toBe('deny system-domain');
    expect(ask({ kind: 'user', user: 165536 })).toBe('allow default');
  });

  it("a member's subordinate ids rank with the members: a user identity's own ranges keep theirs, whatever the order of the policy", () => {
    // vault (990) is a member of staff here, with subordinate uids 165000-170000 overlapping alice's 100000-165535.
    const withVault: Facts = { ...facts, members: new Map([...facts.members!, [50, [990]]]) };
    for (const yaml of [
      'apps:\n  s: {identity: [{group: staff}]}\n  a: {identity: [{user: alice}]}\n',
      'apps:\n  a: {identity: [{user: alice}]}\n  s: {identity: [{group: staff}]}\n',
    ]) {
      const compiled = compileYaml(yaml, { facts: withVault });
      expect(entries(map(compiled, 'app_uid'))).toEqual(['990: app_s', '1000: app_a', '100000-165535: app_a', '165536-170000: app_s']);
      expect(compiled.warnings.map((w) => w.message)).toEqual([
        'uid 165000-165535 (subordinate uids of members of group "staff", for app s) also belong to app a, which keeps them: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
      ]);
      const policy = policyFrom(yaml);
      for (const [user, app] of [
        [165000, 'a'],
        [165536, 's'],
      ] as const) {
        const who = explain(policy, { who: { kind: 'user', user }, host: '192.0.2.1' }, withVault);
        expect('error' in who ? who.error : who.steps.join('; '), String(user)).toContain(`app "${app}"`);
      }
    }
  });

  it('a uid a user identity names comes before the members of a group, whatever the order of the policy; the clash is a warning', () => {
    for (const yaml of [
      'apps:\n  g: {identity: [{group: wheel}]}\n  u: {identity: [{user: alice}]}\n',
      'apps:\n  u: {identity: [{user: alice}]}\n  g: {identity: [{group: wheel}]}\n',
    ]) {
      const compiled = compileYaml(yaml, { facts });
      expect(entries(map(compiled, 'app_uid'))).toEqual(['1000: app_u', '4000: app_g', '100000-165535: app_u']);
      // alice, a member of wheel, brings her subordinate ranges to it too: her own user identity keeps them.
      expect(compiled.warnings.map((w) => w.message)).toEqual([
        'uid 1000 (member of group "wheel", for app g) also belongs to app u, which keeps it: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
        'uid 100000-165535 (subordinate uids of members of group "wheel", for app g) also belong to app u, which keeps them: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
        'gid 100000-165535 (subordinate gids of members of group "wheel", for app g) also belong to app u, which keeps them: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
      ]);
      const who = explain(policyFrom(yaml), { who: { kind: 'user', user: 'alice' }, host: '192.0.2.1' }, facts);
      expect('error' in who ? who.error : who.steps.join('; ')).toContain('app "u"');
    }
    // Two groups sharing a member: the one written first keeps it, one warning for all it shares.
    const both = compileYaml('apps:\n  w: {identity: [{group: wheel}]}\n  s: {identity: [{group: staff}]}\n', { facts });
    expect(entries(map(both, 'app_uid'))).toEqual(['1000: app_w', '4000: app_w', '4001: app_s', '100000-165535: app_w']);
    expect(both.warnings.map((w) => w.message)).toEqual([
      'uid 4000 (member of group "staff", for app s) also belongs to app w, which keeps it: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
    ]);
  });

  it('overlapping ranges: the first owner keeps the overlap, the rest is split around it, and nft takes the map', () => {
    const yaml = 'apps:\n  a: {identity: [{user: alice}]}\n  v: {identity: [{user: vault}, {user: 100005}]}\n';
    const compiled = compileYaml(yaml, { facts });
    // uid 100005 is named by v: a uid named comes before a range; alice's range is split around it.
    expect(entries(map(compiled, 'app_uid'))).toEqual([
      '990: app_v',
      '1000: app_a',
      '100000-100004: app_a',
      '100005: app_v',
      '100006-165535: app_a',
      '165536-170000: app_v',
    ]);
    expect(compiled.warnings.map((w) => w.message).sort()).toEqual([
      'uid 100005 (subordinate uids of user "alice", for app a) also belongs to app v, which keeps it: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
      'uid 165000-165535 (subordinate uids of user "vault", for app v) also belong to app a, which keeps them: ids an identity names come first, then subordinate ids of users, then members of groups and theirs',
    ]);
    if (!nftAvailable()) expect(nftCheck(renderText(compiled.ruleset))).toEqual({ ok: true, stderr: '' });
  });

  it('ranges or members that could not be read are an error wherever they are used, like a failed lookup', () => {
    const broken: Facts = {
      ...facts,
      subordinate: new Map([[1000, { error: '/etc/subuid: EACCES' }]]),
      members: new Map([[10, { error: 'listing users: getpwent_r failed: EIO' }]]),
    };
    const compiled = compileYaml('apps:\n  a: {identity: [{user: alice}, {group: wheel}]}\n', { facts: broken });
    expect(compiled.lookupFailed).toBe(true);
    expect(compiled.errors.map((e) => e.message)).toEqual([
      'cannot read the subordinate ids of user "alice": /etc/subuid: EACCES',
      'cannot read the members of group "wheel": listing users: getpwent_r failed: EIO',
    ]);
    // A member's ranges that could not be read: one error for the group, however many members it has.
    const unread: Facts = {
      ...facts,
      members: new Map([[10, [1000, 4000, 4001]]]),
      subordinate: new Map([1000, 4000, 4001].map((uid) => [uid, { error: '/etc/subgid: EACCES' }])),
    };
    const group = compileYaml('systemDomains: {off: {members: [{group: wheel}]}}\n', { facts: unread });
    expect(group.lookupFailed).toBe(true);
    expect(group.errors.map((e) => e.message)).toEqual(['cannot read the subordinate ids of uid 1000, a member of group "wheel": /etc/subgid: EACCES']);
  });

  it('a name service that may not list its users, and bad lines of the files, are warnings at their place', () => {
    const compiled = compileYaml('systemDomains: {off: {members: [{group: wheel}]}}\n', {
      facts: {
        ...facts,
        membersIncomplete: 'users are also looked up through sss (/etc/nsswitch.conf), which may not list its users',
        warnings: [{ severity: 'warning', at: { file: '/etc/subuid', line: 3, col: 1 }, message: 'subordinate id line skipped: a count of 0' }],
      },
    });
    expect(compiled.warnings.map((w) => `${w.at.file}:${w.at.line} ${w.message}`)).toEqual([
      '/etc/subuid:3 subordinate id line skipped: a count of 0',
      'f.yaml:1 group "wheel" of system domain off: users are also looked up through sss (/etc/nsswitch.conf), which may not list its users; a member whose primary group it is and that it does not list is matched by its group only, and leaves it by changing group (sg, newgrp, a setgid program)',
    ]);
  });

  it('explain agrees: a member of a group, and a uid or gid in a subordinate range, belong', () => {
    const policy = policyFrom('systemDomains: {off: {members: [{user: alice}, {group: staff}]}}\n');
    const ask = (who: Parameters<typeof explain>[1]['who']) => {
      const answer = explain(policy, { who, host: '192.0.2.1' }, facts);
      return 'error' in answer ? answer.error : `${answer.verdict} ${answer.level}`;
    };
    expect(ask({ kind: 'user', user: 100005 })).toBe('deny system-domain');
    expect(ask({ kind: 'group', group: 165535 })).toBe('deny system-domain');
    expect(ask({ kind: 'user', user: 4001 })).toBe('deny system-domain');
    expect(ask({ kind: 'group', group: 'staff' })).toBe('deny system-domain');
    expect(ask({ kind: 'user', user: 165536 })).toBe('allow default');
    expect(ask({ kind: 'user', user: 'vault' })).toBe('allow default');
  });
});
