import { describe, expect, it } from 'vitest';
import type { Facts } from '../../src/compile/compile.js';
import { explain, type Who } from '../../src/compile/explain.js';
import { appTags } from '../../src/compile/ct-mark.js';
import { renderText, type RuleDecl } from '../../src/compile/ruleset.js';
import { compileYaml, FACTS, policyFrom } from '../support/compile-text.js';
import { nftAvailable, nftCheck } from '../support/nft-check.js';
import { evaluate, type Packet } from '../support/ruleset-interpreter.js';

/**
 * Cgroups are looked up before uids and gids. A user whose own app denies
 * made a scope in the subtree systemd delegated to it (chowned to it), named
 * to match another app's glob, moved itself in, and took that app's
 * allowances. A cgroup a non-root uid owns now may take away from what the
 * user's and group's apps allow, never add: deny wins. Root's cgroups decide
 * alone, as before.
 */
const SCOPE = 'user.slice/user-2001.slice/user@2001.service/app.slice/app-firefox-1.scope';
const DELEGATED = ['user.slice/user-2001.slice/user@2001.service', 'user.slice/user-2001.slice/user@2001.service/app.slice', SCOPE];
const FIREFOX = 'user.slice/user-*.slice/user@*.service/app.slice/app-firefox-*.scope';
const FACTS_2001: Facts = {
  ...FACTS,
  cgroups: [...FACTS.cgroups, 'user.slice', 'user.slice/user-2001.slice', ...DELEGATED, 'system.slice/web.service'],
  cgroupOwners: new Map(DELEGATED.map((path) => [path, 2001])),
};

/** firefox (a glob, default deny) may reach 192.0.2.2; build (user 2001, default deny) may reach 198.51.100.1; web is a system unit. */
const POLICY = `
defaults: {egress: allow}
apps:
  firefox: {identity: [{cgroup: "${FIREFOX}"}, {unit: web.service}], default: deny, rules: [{allow: [192.0.2.2]}]}
  build: {identity: {user: 2001}, default: deny, rules: [{allow: [198.51.100.1]}]}
  staff: {identity: {group: 3000}, rules: [{deny: [192.0.2.2]}]}
`;

const packet = (cgroup: string, daddr: string, skuid = 65534, skgid = 65534): Packet => ({
  oif: 'eth0',
  family: 4,
  daddr,
  l4proto: 'tcp',
  dport: 443,
  skuid,
  skgid,
  cgroup,
  ct: 'new',
});

describe('a cgroup its user controls cannot add to what its user and group may do', () => {
  const compiled = compileYaml(POLICY, { facts: FACTS_2001 });
  const chain = (name: string) => compiled.ruleset.chains.find((c) => c.name === name);
  const verdictOf = (p: Packet) => evaluate(compiled.ruleset, p).verdict;

  it("a delegated member goes to a copy of its app's chain whose accepts go on to the apps by uid and gid; a member root made goes to the app itself", () => {
    const map = compiled.ruleset.sets.find((s) => s.name === 'app_cg_l5')!;
    expect(map.elements).toEqual([SCOPE]);
    expect(map.verdicts).toEqual([{ goto: { target: 'uc_app_firefox' } }]);
    const units = compiled.ruleset.sets.find((s) => s.name === 'app_cg_l2')!;
    expect(units.verdicts).toEqual([{ goto: { target: 'app_firefox' } }]);

    // Same rules, same sets and drops; every accept (the allow, the established before the default deny) goes on instead.
    // The copy neither writes nor checks connection marks, and has no claim of answers: whoever decides last marks.
    const marks = (r: RuleDecl) => /ct mark|ct direction/.test(renderText({ ...compiled.ruleset, chains: [{ name: 'c', rules: [r] }], sets: [] }));
    const plain = chain('app_firefox')!.rules;
    const copy = chain('uc_app_firefox')!.rules;
    const verdicts = (rules: readonly RuleDecl[]) => rules.map((r) => JSON.stringify(r.expr.at(-1)));
    const unmarked = plain.filter((r) => !r.expr.some((s) => 'match' in s && JSON.stringify(s.match.left) === '{"ct":{"key":"direction"}}'));
    expect(copy.length).toBe(unmarked.length);
    expect(verdicts(unmarked).filter((v) => v.includes('accept'))).toHaveLength(2);
    expect(verdicts(copy)).toEqual(verdicts(unmarked).map((v) => (v === '{"accept":null}' ? '{"goto":{"target":"uc_root_app_firefox"}}' : v)));
    expect(copy.some(marks)).toBe(false);
    expect(renderText(compiled.ruleset)).toContain('ct state established,related goto uc_root_app_firefox');

    // Where no app has the user or group, the cgroup's app decides alone, marks and all: its own chain, entered afresh.
    const text = renderText({ ...compiled.ruleset, chains: [chain('uc_root_app_firefox')!], sets: [] });
    expect(text.replace(/ comment "[^"]*"/g, '')).toContain('meta skuid vmap @app_uid\n\t\tmeta skgid vmap @app_gid\n\t\tgoto app_firefox\n');
    // Other apps have no copy: they have no delegated member.
    expect(compiled.ruleset.chains.map((c) => c.name).filter((n) => n.startsWith('uc_'))).toEqual(['uc_app_firefox', 'uc_root_app_firefox']);
  });

  it('deny wins both ways: the user in a delegated cgroup of an app that allows is held to its own app, and to the cgroup app where that denies', () => {
    // The escape: build's user in a scope it made, named for firefox, to where firefox allows and build does not.
    expect(verdictOf(packet(SCOPE, '192.0.2.2', 2001))).toBe('drop');
    // The other way: to where build allows and firefox (default deny) does not.
    expect(verdictOf(packet(SCOPE, '198.51.100.1', 2001))).toBe('drop');
    // Where both allow: not here (both default deny), so build's own allowance from its own cgroup still holds.
    expect(verdictOf(packet('user.slice/user-2001.slice/session-1.scope', '198.51.100.1', 2001))).toBe('accept');
    // By group: staff denies 192.0.2.2, so firefox's allowance does not hold for its members either.
    expect(verdictOf(packet(SCOPE, '192.0.2.2', 65534, 3000))).toBe('drop');
    // No app by uid or gid: the cgroup's app decides alone, as before.
    expect(verdictOf(packet(SCOPE, '192.0.2.2'))).toBe('accept');
    expect(verdictOf(packet(SCOPE, '203.0.113.1'))).toBe('drop');
    // Deeper in the delegated subtree: the same element.
    expect(verdictOf(packet(`${SCOPE}/sub`, '192.0.2.2', 2001))).toBe('drop');
  });

  it("connections: the app that decides last owns them, so a delegated member's answers and established packets keep passing, and borrowing stays shut", () => {
    const tags = appTags(['build', 'firefox', 'staff']);
    const mark = (app: string) => tags.get(app)! * 0x10000;
    const run = (p: Packet) => evaluate(compiled.ruleset, p);
    // User 2001 in the delegated scope: an answer on a connection that came in, then more of it. build (its user's app) claims it.
    const both = { ...packet(SCOPE, '192.0.2.2', 2001), ct: 'established' as const, ctDirection: 'reply' as const };
    // firefox allows 192.0.2.2 but build, by its default, only its own connections: unclaimed and answered, build claims it.
    const claimed = run(both);
    expect(claimed).toMatchObject({ verdict: 'accept', ctMark: mark('build') });
    expect(run({ ...both, ctMark: claimed.ctMark })).toMatchObject({ verdict: 'accept', ctMark: mark('build') });
    // Another identity's connection is not build's: the cgroup's app let it through, its user's app does not.
    expect(run({ ...both, ctDirection: 'original', ctMark: mark('staff') }).verdict).toBe('drop');
    // No app by uid or gid (uid 65534): firefox decides alone, with its own marks — its connections pass, another's do not.
    const alone = { ...packet(SCOPE, '203.0.113.9'), ct: 'established' as const };
    expect(run({ ...alone, ctMark: mark('firefox') }).verdict).toBe('accept');
    expect(run({ ...alone, ctMark: mark('staff') }).verdict).toBe('drop');
  });

  it("a cgroup root made decides alone, whatever its process's user: a system unit's identity holds", () => {
    expect(verdictOf(packet('system.slice/web.service', '192.0.2.2', 2001))).toBe('accept');
    expect(verdictOf(packet('system.slice/web.service', '198.51.100.1', 2001))).toBe('drop');
  });

  it('the app tracker gets both verdicts: for a new cgroup root owns, and for one a user owns', () => {
    expect(compiled.cgroupBindings).toEqual([
      expect.objectContaining({ glob: FIREFOX, verdict: { goto: { target: 'app_firefox' } }, delegatedVerdict: { goto: { target: 'uc_app_firefox' } } }),
      expect.objectContaining({
        glob: 'system.slice/web.service',
        verdict: { goto: { target: 'app_firefox' } },
        delegatedVerdict: { goto: { target: 'uc_app_firefox' } },
      }),
    ]);
    // An app with no delegated member yet has its copy all the same: the tracker adds the first one at once, without a compile.
    const none = compileYaml(POLICY, { facts: { ...FACTS_2001, cgroupOwners: new Map() } });
    expect(none.ruleset.chains.map((c) => c.name).filter((name) => name.startsWith('uc_'))).toEqual(['uc_app_firefox', 'uc_root_app_firefox']);
    expect(none.ruleset.chains.find((c) => c.name === 'uc_app_firefox')).toEqual(compiled.ruleset.chains.find((c) => c.name === 'uc_app_firefox'));
    expect(none.cgroupBindings[0]).toMatchObject({ verdict: { goto: { target: 'app_firefox' } }, delegatedVerdict: { goto: { target: 'uc_app_firefox' } } });
  });

  it('no copies where nothing could be taken away: no app names a user or group, or the identity only takes away (system domains, updaters with Tor on loopback)', () => {
    const noUsers = compileYaml(`apps: {firefox: {identity: {cgroup: "${FIREFOX}"}, default: deny, rules: [{allow: [192.0.2.2]}]}}\n`, { facts: FACTS_2001 });
    expect(noUsers.ruleset.sets.find((s) => s.name === 'app_cg_l5')!.verdicts).toEqual([{ goto: { target: 'app_firefox' } }]);
    expect(noUsers.ruleset.chains.some((c) => c.name.startsWith('uc_'))).toBe(false);
    expect(noUsers.cgroupBindings[0]!.delegatedVerdict).toEqual({ goto: { target: 'app_firefox' } });

    const others = compileYaml(
      `${POLICY}systemDomains: {offline: {members: [{cgroup: "${FIREFOX}"}]}}\ntor: {enabled: true, socks: 127.0.0.1:9050, user: debian-tor, updaters: [{cgroup: "${FIREFOX}"}]}\n`,
      { facts: FACTS_2001 },
    );
    expect(others.ruleset.sets.find((s) => s.name === 'sd_cg_l5')!.verdicts).toEqual([{ goto: { target: 'sd_offline' } }]);
    expect(others.ruleset.sets.find((s) => s.name === 'tor_cg_l5')!.verdicts).toEqual([{ goto: { target: 'tor_updaters' } }]);
  });

  it("updaters over Tor with a SOCKS gateway on another host: the gateway is network, so a delegated updater cgroup is held to its user's app too", () => {
    const tor = compileYaml(`${POLICY}tor: {enabled: true, socks: 192.0.2.50:9050, user: debian-tor, updaters: [{cgroup: "${FIREFOX}"}]}\n`, {
      facts: FACTS_2001,
    });
    expect(tor.ruleset.sets.find((s) => s.name === 'tor_cg_l5')!.verdicts).toEqual([{ goto: { target: 'uc_tor_updaters' } }]);
    const toGateway = { ...packet(SCOPE, '192.0.2.50', 2001), dport: 9050 };
    expect(evaluate(tor.ruleset, toGateway).verdict).toBe('drop');
    expect(evaluate(tor.ruleset, { ...toGateway, skuid: 65534 }).verdict).toBe('accept');
  });

  it.skipIf(nftAvailable())('the real nft accepts the copies: no chain loops', () => {
    const tor = compileYaml(`${POLICY}tor: {enabled: true, socks: 192.0.2.50:9050, user: debian-tor, updaters: [{cgroup: "${FIREFOX}"}]}\n`, {
      facts: FACTS_2001,
    });
    expect(nftCheck(renderText(tor.ruleset), { cgroups: FACTS_2001.cgroups }).stderr).toBe('');
  });
});

describe('explain says so', () => {
  const policy = policyFrom(POLICY);
  const ask = (who: Who, host: string) => {
    const answer = explain(policy, { who, host, port: 443, proto: 'tcp' }, FACTS_2001);
    if ('error' in answer) throw new Error(answer.error);
    return answer;
  };

  it("a delegated cgroup asked with its user: the user's app decides what the cgroup's app lets out", () => {
    const answer = ask({ kind: 'cgroup', path: SCOPE, user: 2001 }, '192.0.2.2');
    expect(answer).toMatchObject({ verdict: 'deny', ruleId: 'app/build/default', level: 'default' });
    expect(answer.steps).toContain(
      `cgroup ${SCOPE} is owned by uid 2001 (delegated), so what app "firefox" lets out, app "build" of its user or group must let out too`,
    );
    expect(ask({ kind: 'cgroup', path: SCOPE, user: 2001 }, '198.51.100.1')).toMatchObject({ verdict: 'deny', ruleId: 'app/firefox/default' });
    const unasked = ask({ kind: 'cgroup', path: SCOPE }, '192.0.2.2');
    expect(unasked).toMatchObject({ verdict: 'allow', ruleId: 'app/firefox/0' });
    expect(unasked.notes).toContain(
      `cgroup ${SCOPE} is owned by uid 2001 (delegated): its process's user's or group's app must let this out too; give --as user:NAME to see`,
    );
    expect(ask({ kind: 'cgroup', path: 'system.slice/web.service', user: 2001 }, '192.0.2.2')).toMatchObject({ verdict: 'allow', ruleId: 'app/firefox/0' });
  });
});
