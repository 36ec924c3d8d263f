import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { compile, type Facts } from '../../src/compile/compile.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import type { Policy } from '../../src/policy/model.js';
import { buildDecider, CANARY, type DecideSettings } from '../../src/resolver/decide.js';
import type { Who } from '../../src/resolver/who.js';
import { FACTS, policyFrom } from '../support/compile-text.js';

/** alice (1000) has subordinate uids 100000–165535; wheel (10) has members 1000 and 5555; vault is 990. */
const TEST_FACTS: Facts = {
  ...FACTS,
  groups: new Map([...FACTS.groups, ['staff', 50]]),
  cgroups: [
    ...FACTS.cgroups,
    'user.slice',
    'user.slice/user-1000.slice',
    'user.slice/user-1000.slice/user@1000.service',
    'user.slice/user-1000.slice/user@1000.service/app.slice',
    'user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope',
  ],
  cgroupOwners: new Map([
    ['user.slice/user-1000.slice/user@1000.service', 1000],
    ['user.slice/user-1000.slice/user@1000.service/app.slice', 1000],
    ['user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope', 1000],
  ]),
  subordinate: new Map([[1000, { uids: [{ from: 100000, to: 165535 }], gids: [] }]]),
  members: new Map([[10, [1000, 5555]]]),
};

const NX: DecideSettings = { deniedAnswer: 'nxdomain' };
const q = (name: string) => ({ name, type: 'A' });

function decider(yaml: string, settings: DecideSettings = NX, facts: Facts = TEST_FACTS) {
  const policy = policyFrom(yaml);
  const compiled = compile(policy, facts, {});
  return { policy, bindings: compiled.dnsBindings, decide: buildDecider(policy, compiled.dnsBindings, facts, settings) };
}

const NOBODY: Who = { uid: 65534 };
const ALICE: Who = { uid: 1000 };

describe('decide: names denied for everyone', () => {
  const yaml = `
defaults: {egress: allow}
deny:
  - to: ["tracker.test", "*.ads.test"]
apps:
  browser:
    identity: {user: alice}
    rules:
      - allow: ["tracker.test"]
        ports: [443]
`;
  it('a CNAME chain ending in a denied name is denied, though the name asked for is not', () => {
    const { decide } = decider(yaml);
    expect(decide.shape(NOBODY, q('www.shop.test'), ['www.shop.test'])).toBe('answer');
    expect(decide.shape(NOBODY, q('www.shop.test'), ['www.shop.test', 'cdn.shop.test', 'x.ads.test'])).toBe('nxdomain');
    // *.ads.test covers ads.test itself.
    expect(decide.shape(NOBODY, q('ads.test'), ['ads.test'])).toBe('nxdomain');
    expect(decide.shape(NOBODY, q('notads.test'), ['notads.test'])).toBe('answer');
  });

  it('an app allowed a globally denied name (on one port) gets the true answer; everyone else the denied answer', () => {
    const { decide } = decider(yaml);
    expect(decide.shape(ALICE, q('tracker.test'), ['tracker.test'])).toBe('answer');
    expect(decide.shape(NOBODY, q('tracker.test'), ['tracker.test'])).toBe('nxdomain');
    // Its allowance is for tracker.test only: the rest of the list still holds for it.
    expect(decide.shape(ALICE, q('a.ads.test'), ['a.ads.test'])).toBe('nxdomain');
  });

  it("the denied answer is the policy's: NXDOMAIN, null addresses, or the true answer", () => {
    expect(decider(yaml, { deniedAnswer: 'null' }).decide.shape(NOBODY, q('tracker.test'), ['tracker.test'])).toBe('null');
    expect(decider(yaml, { deniedAnswer: 'true' }).decide.shape(NOBODY, q('tracker.test'), ['tracker.test'])).toBe('answer');
  });

  it('a global deny limited to some ports denies no name: the name stays reachable on the others', () => {
    const { decide } = decider(`
deny:
  - to: ["tracker.test"]
    ports: [80]
`);
    expect(decide.shape(NOBODY, q('tracker.test'), ['tracker.test'])).toBe('answer');
  });
});

describe("decide: an app's own rules", () => {
  it("an app's deny by name counts, before a later allow; an allow before it wins", () => {
    const { decide } = decider(`
apps:
  first-deny:
    identity: {user: alice}
    rules:
      - deny: ["*.example.org"]
      - allow: ["api.example.org"]
  first-allow:
    identity: {user: vault}
    rules:
      - allow: ["api.example.org"]
      - deny: ["*.example.org"]
`);
    expect(decide.shape(ALICE, q('api.example.org'), ['api.example.org'])).toBe('nxdomain');
    expect(decide.shape({ uid: 990 }, q('api.example.org'), ['api.example.org'])).toBe('answer');
    expect(decide.shape({ uid: 990 }, q('www.example.org'), ['www.example.org'])).toBe('nxdomain');
    // Nobody else is held to these apps' rules.
    expect(decide.shape(NOBODY, q('www.example.org'), ['www.example.org'])).toBe('answer');
  });

  it('an allow on some ports outranks the global deny list unless an earlier deny of the app takes those ports', () => {
    const { decide } = decider(`
deny:
  - to: ["tracker.test"]
apps:
  shadowed:
    identity: {user: alice}
    rules:
      - deny: any
        ports: [53, "8000-8100"]
      - allow: any
        ports: [53, "8000-8100"]
  partly:
    identity: {user: vault}
    rules:
      - deny: any
        ports: [53]
      - allow: ["tracker.test"]
        ports: [53, 443]
`);
    // Every port alice's allow names, its deny took first: no connection to tracker.test gets out, and the global list names it.
    expect(decide.shape(ALICE, q('tracker.test'), ['tracker.test'])).toBe('nxdomain');
    // vault reaches tracker.test on 443.
    expect(decide.shape({ uid: 990 }, q('tracker.test'), ['tracker.test'])).toBe('answer');
  });

  it('a deny of every destination or a default deny denies no name by name: the kernel drops, the answer is true', () => {
    const { decide } = decider(`
deny:
  - to: ["tracker.test"]
apps:
  closed:
    identity: {user: alice}
    default: deny
    rules:
      - deny: any
        proto: udp
`);
    expect(decide.shape(ALICE, q('example.org'), ['example.org'])).toBe('answer');
    // The limited deny of any does not stop the walk: the global deny list still names tracker.test.
    expect(decide.shape(ALICE, q('tracker.test'), ['tracker.test'])).toBe('nxdomain');
  });

  it("a delegated cgroup's allow goes on to its user's app, whose deny by name holds", () => {
    const { decide } = decider(`
apps:
  firefox:
    identity: {cgroup: "user.slice/user-*.slice/user@*.service/app.slice/app-firefox-*.scope"}
    rules:
      - allow: ["tracker.test"]
  alice:
    identity: {user: alice}
    rules:
      - deny: ["tracker.test"]
  other:
    identity: {user: vault}
    rules:
      - allow: any
`);
    const scope = 'user.slice/user-1000.slice/user@1000.service/app.slice/app-firefox-1.scope';
    expect(decide.shape({ uid: 1000, cgroup: scope }, q('tracker.test'), ['tracker.test'])).toBe('nxdomain');
    // In the user's other cgroups, the user's own app decides.
    expect(decide.shape({ uid: 1000, cgroup: 'user.slice/user-1000.slice/session-2.scope' }, q('tracker.test'), ['tracker.test'])).toBe('nxdomain');
    // Another uid in that cgroup is held to the cgroup's app and its own uid's: vault's allows.
    expect(decide.shape({ uid: 990, cgroup: scope }, q('tracker.test'), ['tracker.test'])).toBe('answer');
  });
});

describe('decide: names below a denied suffix are answered without asking upstream', () => {
  const yaml = `
defaults: {egress: allow}
lists:
  vendors: {names: ["*.vendor.test", "exact.listed.test"]}
deny:
  - to: ["*.telemetry.test", "spelled.sub.telemetry.test", "@vendors"]
apps:
  collector:
    identity: {user: alice}
    rules:
      - allow: ["ok.telemetry.test"]
        ports: [443]
tor:
  enabled: true
  updaters:
    - {user: _apt}
`;
  it('a name strictly below a suffix denied by name is given the denied answer at admit; the apex and spelled-out names are asked', () => {
    const { decide } = decider(yaml);
    expect(decide.admit(NOBODY, q('payload.sub.telemetry.test'))).toBe('nxdomain');
    expect(decide.admit(NOBODY, q('x.telemetry.test'))).toBe('nxdomain');
    expect(decide.admit(NOBODY, { name: 'payload.telemetry.test', type: 'TXT' })).toBe('nxdomain');
    // Whatever the spelling: the resolver hands admit the lower-cased name, and admit asks the index as it does.
    expect(decide.admit(NOBODY, q('PayLoad.Telemetry.TEST.'))).toBe('nxdomain');
    // No label of these is the asker's: asked, so that their addresses go into the deny set.
    expect(decide.admit(NOBODY, q('telemetry.test'))).toBe('go');
    expect(decide.admit(NOBODY, q('spelled.sub.telemetry.test'))).toBe('go');
    expect(decide.shape(NOBODY, q('spelled.sub.telemetry.test'), ['spelled.sub.telemetry.test'])).toBe('nxdomain');
    // A list's suffixes as a rule's; its exact names are spelled out, and names below them are not denied.
    expect(decide.admit(NOBODY, q('payload.vendor.test'))).toBe('nxdomain');
    expect(decide.admit(NOBODY, q('vendor.test'))).toBe('go');
    expect(decide.admit(NOBODY, q('exact.listed.test'))).toBe('go');
    expect(decide.admit(NOBODY, q('below.exact.listed.test'))).toBe('go');
    // Names that merely end alike are not below the suffix.
    expect(decide.admit(NOBODY, q('nottelemetry.test'))).toBe('go');
  });

  it('asked as before where the asker gets the true answer: an app allowed the name on a port, Tor itself, dns.deniedAnswer "true"', () => {
    const { decide } = decider(yaml);
    expect(decide.admit(ALICE, q('ok.telemetry.test'))).toBe('go');
    expect(decide.shape(ALICE, q('ok.telemetry.test'), ['ok.telemetry.test'])).toBe('answer');
    // Its allowance is for that name only.
    expect(decide.admit(ALICE, q('payload.telemetry.test'))).toBe('nxdomain');
    expect(decide.admit({ uid: 110 }, q('payload.telemetry.test'))).toBe('go');
    expect(decider(yaml, { deniedAnswer: 'true' }).decide.admit(NOBODY, q('payload.telemetry.test'))).toBe('go');
    // An updater confined to Tor is refused before anything.
    expect(decide.admit({ uid: 42 }, q('payload.telemetry.test'))).toBe('refused');
  });

  it('the answer given is the policy\'s denied answer: the null answer where it says "null"', () => {
    const { decide } = decider(yaml, { deniedAnswer: 'null' });
    expect(decide.admit(NOBODY, q('payload.telemetry.test'))).toBe('null');
    expect(decide.admit(NOBODY, q('telemetry.test'))).toBe('go');
  });

  it('a name denied only through its CNAME chain is asked: the chain is known from the answer alone', () => {
    const { decide } = decider(yaml);
    expect(decide.admit(NOBODY, q('www.shop.test'))).toBe('go');
    expect(decide.shape(NOBODY, q('www.shop.test'), ['www.shop.test', 'payload.telemetry.test'])).toBe('nxdomain');
  });

  it('a deny limited to some ports, a deny of any destination and a default deny deny no name: asked', () => {
    const { decide } = decider(`
defaults: {egress: deny}
deny:
  - to: ["*.limited.test"]
    ports: [443]
apps:
  closed:
    identity: {user: alice}
    rules:
      - deny: any
`);
    expect(decide.admit(NOBODY, q('payload.limited.test'))).toBe('go');
    expect(decide.admit(NOBODY, q('payload.example.org'))).toBe('go');
    expect(decide.admit(ALICE, q('payload.example.org'))).toBe('go');
  });
});

describe('decide: who may ask at all', () => {
  const yaml = `
deny:
  - to: ["tracker.test"]
identities:
  vault: {user: vault}
systemDomains:
  offline:
    members:
      - vault
      - {group: wheel}
      - {user: alice}
tor:
  enabled: true
  updaters:
    - {user: _apt}
`;
  it('members of a system domain are refused: by user, by subordinate uid, by group member', () => {
    const { decide } = decider(yaml);
    expect(decide.admit({ uid: 990 }, q('example.org'))).toBe('refused');
    expect(decide.admit({ uid: 120000 }, q('example.org'))).toBe('refused'); // alice's subordinate uid
    expect(decide.admit({ uid: 5555 }, q('example.org'))).toBe('refused'); // a member of wheel by uid
    expect(decide.admit({ uid: 4242, cgroup: 'system.slice/a.service', gid: 10 }, q('example.org'))).toBe('refused'); // sends with wheel's gid
    expect(decide.admit({ uid: 4242 }, q('example.org'))).toBe('go');
    expect(decide.admit({ uid: 165536 }, q('example.org'))).toBe('go'); // past alice's range
    // Refused before the canary is answered: a member gets nothing at all.
    expect(decide.admit({ uid: 990 }, q(CANARY))).toBe('refused');
  });

  it('an updater confined to Tor is refused any name (it resolves inside Tor); Tor itself gets true answers', () => {
    const { decide } = decider(yaml);
    expect(decide.admit({ uid: 42 }, q('deb.debian.org'))).toBe('refused');
    expect(decide.admit({ uid: 110 }, q('tracker.test'))).toBe('go');
    expect(decide.shape({ uid: 110 }, q('tracker.test'), ['tracker.test'])).toBe('answer');
    expect(decide.shape(NOBODY, q('tracker.test'), ['tracker.test'])).toBe('nxdomain');
  });

  it("use-application-dns.net and names below it are NXDOMAIN (Mozilla's canary, RFC 8020); names that merely end alike are not", () => {
    const { decide } = decider('defaults: {egress: allow}\n');
    expect(decide.admit(NOBODY, q('use-application-dns.net'))).toBe('nxdomain');
    expect(decide.admit(NOBODY, { name: 'use-application-dns.net', type: 'AAAA' })).toBe('nxdomain');
    expect(decide.admit(NOBODY, q('x.use-application-dns.net'))).toBe('nxdomain');
    expect(decide.admit(NOBODY, q('fake-use-application-dns.net'))).toBe('go');
    expect(decide.admit(NOBODY, q('application-dns.net'))).toBe('go');
  });
});

describe('decide: the sets an answer fills', () => {
  it('bindingsFor is every rule whose names cover any name of the chain, whoever asks', () => {
    const { decide, bindings } = decider(`
deny:
  - to: ["*.ads.test"]
apps:
  a:
    identity: {user: alice}
    rules:
      - allow: ["www.shop.test"]
      - allow: ["cdn.shop.test", "192.0.2.0/24"]
`);
    const ids = decide.bindingsFor(['www.shop.test', 'cdn.shop.test', 'x.ads.test']);
    expect(ids.map((i) => bindings[i]!.ruleId).sort()).toEqual(['app/a/0', 'app/a/1', 'deny/f.yaml/0'].sort());
    expect(decide.bindingsFor(['other.test'])).toEqual([]);
    expect(decide.bindingsFor(['ads.test'])).toEqual([bindings.findIndex((b) => b.ruleId === 'deny/f.yaml/0')]);
  });
});

describe('decide with the shipped policy and its 143,876-name list', () => {
  function shipped(extra: string): { policy: Policy; dir: string } {
    const dir = mkdtempSync(join(tmpdir(), 'egd-decide-'));
    cpSync(join(import.meta.dirname, '../../policies'), dir, { recursive: true });
    writeFileSync(join(dir, '90-test.yaml'), extra);
    const loaded = loadPolicyDir(dir);
    if (!loaded.ok) throw new Error(JSON.stringify(loaded.errors));
    return { policy: loaded.policy, dir };
  }

  it('a listed name is NXDOMAIN for everyone but the app allowed it, and building and asking stay fast', () => {
    const names = readFileSync(join(import.meta.dirname, '../../policies/lists/tracking.txt'), 'utf8')
      .split('\n')
      .filter((line) => line && !line.startsWith('#'))
      .map((line) => line.trim().split(/\s+/).pop()!);
    const listed = names[1000]!;
    const { policy, dir } = shipped(`
apps:
  allowed:
    identity: {user: alice}
    rules:
      - allow: ["${listed}"]
`);
    try {
      const compiled = compile(policy, TEST_FACTS, {});
      const started = performance.now();
      const decide = buildDecider(policy, compiled.dnsBindings, TEST_FACTS, NX);
      const buildMs = performance.now() - started;
      expect(decide.shape(NOBODY, q(listed), [listed])).toBe('nxdomain');
      expect(decide.shape(ALICE, q(listed), [listed])).toBe('answer');
      expect(decide.shape(NOBODY, q('example.org'), ['www.example.org', 'example.org'])).toBe('answer');
      // Per query: identify → admit → shape → bindingsFor, over a spread of listed and unlisted names.
      const whos: Who[] = [NOBODY, ALICE, { uid: 990 }, { uid: 4242, cgroup: 'system.slice/a.service' }];
      const asked = names.slice(0, 20_000).map((name, i) => (i % 2 ? name : `unlisted-${i}.example.net`));
      const t0 = performance.now();
      let denied = 0;
      for (const [i, name] of asked.entries()) {
        const who = whos[i % whos.length]!;
        if (decide.admit(who, q(name)) !== 'go') continue;
        if (decide.shape(who, q(name), [name, 'edge.cdn.example.net']) !== 'answer') denied++;
        decide.bindingsFor([name, 'edge.cdn.example.net']);
      }
      const perQueryUs = ((performance.now() - t0) * 1000) / asked.length;
      console.log(
        `decide, shipped list: build ${buildMs.toFixed(1)} ms, ${perQueryUs.toFixed(2)} µs per query (admit+shape+bindingsFor), ${denied} of ${asked.length} denied`,
      );
      // Half the names are listed; alice (a quarter of the askers) is allowed one of them only.
      expect(denied).toBe(asked.length / 2);
      // Loose bounds, for a loaded machine: a walk of the list per name (≈ 1 ms) would still fail them.
      expect(buildMs).toBeLessThan(5000);
      expect(perQueryUs).toBeLessThan(250);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
