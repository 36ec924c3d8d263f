import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cgroupGlobMatcher } from '../../src/compile/glob.js';
import { formatIssue } from '../../src/policy/issues.js';
import { loadPolicyDir, loadPolicyOrThrow } from '../../src/policy/load.js';
import { policyDir } from '../support/policy-dir.js';

// The shipped copies of the shared lists; the test below checks they are the same bytes when ../shared is there.
const LISTS = join(import.meta.dirname, '..', '..', 'policies', 'lists');
const SHARED = join(import.meta.dirname, '..', '..', '..', 'shared', 'data', 'blocklists');

/** Loads and returns the formatted errors (file:line:col: message (hint)), failing if the load succeeded. */
function errorsOf(files: Parameters<typeof policyDir>[0]): string[] {
  const dir = policyDir(files);
  const result = loadPolicyDir(dir);
  if (result.ok) throw new Error('expected the policy to be rejected');
  return result.errors.map((issue) => formatIssue(issue));
}

describe('policy loader: valid input', () => {
  it('merges files in lexical order; later files override defaults and tor fields', () => {
    const dir = policyDir({
      '10-b.yaml': 'defaults: {egress: deny}\ntor: {enabled: false, socks: "127.0.0.1:9150"}\n',
      '90-local.yaml': 'tor: {enabled: true}\n',
      '05-a.yml': 'defaults: {egress: allow, log: {group: 3}}\n',
      'README.txt': 'not a policy',
    });
    const { policy } = loadPolicyOrThrow(dir);
    expect(policy.files).toEqual(['05-a.yml', '10-b.yaml', '90-local.yaml']);
    expect(policy.defaults.egress).toBe('deny');
    expect(policy.defaults.log.group).toBe(3);
    expect(policy.tor.enabled).toBe(true);
    expect(policy.tor.socks).toEqual({ family: 4, address: '127.0.0.1', port: 9150 });
  });

  it('resolves identities, inline selectors, lists, catalogue categories and CIDRs', () => {
    const dir = policyDir({
      'a.yaml': `
identities:
  web: [{flatpak: org.example.Web}, {user: 1000}]
lists:
  ads: {file: lists/ads.txt}
catalogue:
  demo-telemetry: {software: Demo, reports: usage, category: telemetry, names: [t.example.org, "*.m.example.org"], source: "https://example.org/src"}
apps:
  web:
    identity: web
    rules:
      - allow: [Example.ORG., "*.cdn.example.net", "2001:DB8::/32", 192.0.2.0/24, "@ads", "catalogue:telemetry"]
        ports: [443, "8000-8100"]
  svc:
    identity: {unit: demo.service, slice: demo-sub.slice}
`,
      'lists/ads.txt': '# comment\nads.example.com\n0.0.0.0 hosts-style.example.com other.example.com # trailing\n*.wild.example.com\n',
    });
    const { policy, warnings } = loadPolicyOrThrow(dir);
    expect(warnings).toEqual([]);
    const web = policy.apps.find((a) => a.name === 'web')!;
    expect(web.identities[0]!.selectors).toEqual([
      {
        kind: 'cgroup',
        glob: 'user.slice/user-*.slice/user@*.service/app.slice/app-flatpak-org.example.Web-#.scope',
        level: 5,
        written: 'flatpak org.example.Web',
      },
      { kind: 'user', user: 1000 },
    ]);
    const rule = web.rules[0]!;
    expect(rule.to.names).toEqual(['example.org', 't.example.org']);
    expect(rule.to.suffixes).toEqual(['cdn.example.net', 'm.example.org']);
    expect(rule.to.networks).toEqual([
      { family: 4, address: '192.0.2.0', prefix: 24 },
      { family: 6, address: '2001:db8::', prefix: 32 },
    ]);
    expect(rule.to.lists).toEqual(['ads']);
    expect(rule.to.catalogueEntries).toEqual(['demo-telemetry']);
    expect(rule.protocols).toEqual(['tcp', 'udp']);
    expect(rule.ports).toEqual([
      { from: 443, to: 443 },
      { from: 8000, to: 8100 },
    ]);
    expect(rule.at).toMatchObject({ file: 'a.yaml', line: 12 });
    const ads = policy.lists.get('ads')!;
    expect([...ads.names]).toEqual(['ads.example.com', 'hosts-style.example.com', 'other.example.com']);
    expect([...ads.suffixes]).toEqual(['wild.example.com']);
    const svc = policy.apps.find((a) => a.name === 'svc')!;
    expect(svc.identities[0]!.selectors[0]).toMatchObject({ glob: 'demo.slice/demo-sub.slice/demo.service', level: 3 });
  });

  it('loads the shared tracking list (143,876 names) and the hosts-format Windows telemetry list', () => {
    const dir = policyDir({
      'lists.yaml': `lists:\n  tracking: {file: ${join(LISTS, 'tracking.txt')}, format: plain}\n  spy: {file: ${join(LISTS, 'windows-spy.hosts')}, format: hosts}\ndeny:\n  - to: ["@tracking", "@spy"]\n`,
    });
    const { policy } = loadPolicyOrThrow(dir);
    expect(policy.lists.get('tracking')!.names.size).toBe(143_876);
    const spy = [...policy.lists.get('spy')!.names];
    expect(spy).toContain('alpha.telemetry.microsoft.com');
    expect(spy).not.toContain('0.0.0.0');
    expect(spy.length).toBeGreaterThan(300);
  });

  it.skipIf(!existsSync(SHARED))('the shipped lists are byte-identical copies of ../shared/data/blocklists, licences included', () => {
    for (const file of ['tracking.txt', 'windows-spy.hosts', 'LICENSE.blocklistproject', 'LICENSE.windowsspyblocker']) {
      expect(readFileSync(join(LISTS, file)).equals(readFileSync(join(SHARED, file))), file).toBe(true);
    }
  });

  it('warns, with file:line, about list lines that are not names, and keeps the rest', () => {
    const dir = policyDir({ 'a.yaml': 'lists:\n  l: {file: l.txt}\n', 'l.txt': 'good.example.org\nbad name here\nhttp://x.example/\nalso-good.example.org\n' });
    const result = loadPolicyDir(dir);
    expect(result.ok).toBe(true);
    if (!result.ok) return;
    expect([...result.policy.lists.get('l')!.names]).toEqual(['good.example.org', 'also-good.example.org']);
    expect(result.warnings.map((w) => formatIssue(w))).toEqual([
      'l.txt:2:5: warning: skipped "bad name here": a plain list has one name per line',
      'l.txt:3:1: warning: skipped "http://x.example/": label "http://x" has characters a DNS name cannot have',
    ]);
  });

  it('list files may hold addresses and CIDRs; rules using the list match them, nested networks folded', () => {
    const dir = policyDir({
      'a.yaml': 'lists:\n  bad-nets: {file: nets.txt}\ndeny:\n  - to: ["@bad-nets", 192.0.2.128/25, 198.51.100.0/24]\n',
      'nets.txt': '# an IP blocklist\n192.0.2.0/24\n198.51.100.7\n2001:db8::/32\n2001:db8:1::/48\n203.0.113.1/24\n',
    });
    const result = loadPolicyDir(dir);
    expect(result.ok).toBe(true);
    if (!result.ok) return;
    const rule = result.policy.globalDeny[0]!;
    expect(rule.to.lists).toEqual([]);
    expect(rule.to.networks.map((n) => `${n.address}/${n.prefix}`)).toEqual(['192.0.2.0/24', '198.51.100.0/24', '2001:db8::/32']);
    expect(result.warnings.map((w) => formatIssue(w))).toEqual([
      'nets.txt:6:1: warning: skipped "203.0.113.1/24": "203.0.113.1/24" has host bits set below the /24 prefix (did you mean 203.0.113.0/24?)',
    ]);
  });

  it('warns when an app shares an identity with a system domain, since the domain wins', () => {
    const dir = policyDir({
      'a.yaml': 'identities: {v: {user: vault}}\napps: {sync: {identity: v, rules: [{allow: any}]}}\nsystemDomains: {off: {members: [v]}}\n',
    });
    const result = loadPolicyDir(dir);
    expect(result.ok).toBe(true);
    expect(result.warnings.map((w) => w.message)).toEqual([
      'app "sync" shares identity "v" with system domain "off"; the system domain wins and keeps it offline',
    ]);
  });
});

describe('policy loader: every class of bad input is an error with file:line:col', () => {
  it('YAML syntax', () => {
    expect(errorsOf({ 'a.yaml': 'apps:\n  x: [1, 2\n' })[0]).toMatch(/^a\.yaml:\d+:\d+: YAML: /);
  });

  it('duplicate YAML keys', () => {
    expect(errorsOf({ 'a.yaml': 'defaults: {egress: deny}\ndefaults: {egress: allow}\n' })[0]).toMatch(/^a\.yaml:2:1: YAML: Map keys must be unique/);
  });

  it('unknown key, pointing at the key', () => {
    expect(errorsOf({ 'a.yaml': 'defaults:\n  egres: deny\n' })).toEqual([
      'a.yaml:2:3: unknown key "egres" (at defaults) (see `egressctl schema` for the keys each section takes)',
    ]);
  });

  it('an app or identity name that breaks the naming rule says the rule, at the name', () => {
    const long = 'a'.repeat(33);
    const rule = 'names are 1–32 characters: lower case letters, digits, "-" and "_", starting with a letter';
    expect(errorsOf({ '00.yaml': `identities:\n  ${long}: {user: root}\napps:\n  Web:\n    identity: {user: root}\n` })).toEqual([
      `00.yaml:2:3: "${long}" is not a valid name: ${rule} (at identities)`,
      `00.yaml:4:3: "Web" is not a valid name: ${rule} (at apps)`,
    ]);
    expect(errorsOf({ '00.yaml': 'lists:\n  "my list": [a.example]\nsystemDomains:\n  Offline: {members: [{user: root}]}\n' })).toEqual([
      `00.yaml:2:3: "my list" is not a valid name: ${rule} (at lists)`,
      `00.yaml:4:3: "Offline" is not a valid name: ${rule} (at systemDomains)`,
    ]);
  });

  it('bad CIDRs and addresses, with a hint for host bits', () => {
    const errors = errorsOf({ 'a.yaml': 'deny:\n  - to: [192.0.2.1/24, 10.0.0.300, "2001:db8::1/129"]\n' });
    expect(errors).toEqual([
      'a.yaml:2:10: "192.0.2.1/24" has host bits set below the /24 prefix (at deny[0].to[0]) (did you mean 192.0.2.0/24?)',
      'a.yaml:2:24: "10.0.0.300" is not a valid IPv4 or IPv6 address (at deny[0].to[1])',
      'a.yaml:2:36: "2001:db8::1/129" has prefix length /129; IPv6 allows /0 to /128 (at deny[0].to[2])',
    ]);
  });

  it('ports out of range and reversed ranges', () => {
    const errors = errorsOf({ 'a.yaml': 'deny:\n  - to: any\n    ports: [0, 70000, "9000-8000", "http"]\n' });
    expect(errors).toHaveLength(4);
    expect(errors[0]).toMatch(/^a\.yaml:3:13: /);
    expect(errors[2]).toBe(
      'a.yaml:3:23: "9000-8000" is not a port or port range (at deny[0].ports[2]) (ports are 1–65535; a range is written "8000-8100" with the lower port first)',
    );
  });

  it('icmp with ports', () => {
    expect(errorsOf({ 'a.yaml': 'deny:\n  - to: any\n    proto: icmp\n    ports: [1]\n' })).toEqual([
      'a.yaml:3:12: icmp has no ports (split the rule: one for tcp/udp with ports, one for icmp)',
    ]);
  });

  it('unknown list, with a suggestion', () => {
    expect(errorsOf({ 'a.yaml': 'lists:\n  tracking: {names: [a.example]}\ndeny:\n  - to: ["@trackin"]\n' })).toEqual([
      'a.yaml:4:10: unknown list "@trackin" (did you mean @tracking?)',
    ]);
  });

  it('unknown identity reference, in apps, system domains and tor', () => {
    const errors = errorsOf({
      'a.yaml': 'identities:\n  apt: {user: _apt}\napps:\n  x: {identity: nosuch}\nsystemDomains:\n  d: {members: [apt, ghost]}\ntor:\n  updaters: [atp]\n',
    });
    expect(errors).toEqual([
      'a.yaml:4:17: unknown identity "nosuch" (known identities: apt)',
      'a.yaml:6:22: unknown identity "ghost" (known identities: apt)',
      'a.yaml:8:14: unknown identity "atp" (did you mean apt?)',
    ]);
  });

  it('duplicate names across files name both places', () => {
    expect(errorsOf({ '10-a.yaml': 'identities:\n  x: {user: 1}\n', '20-b.yaml': '\nidentities:\n  x: {user: 2}\n' })).toEqual([
      '20-b.yaml:3:3: duplicate identities entry "x"; it is already defined at 10-a.yaml:2 (names must be unique across all files of the directory)',
    ]);
  });

  it('empty selector, and a selector of two kinds', () => {
    const errors = errorsOf({ 'a.yaml': 'identities:\n  a: {}\n  b: {user: 1, group: 2}\n' });
    expect(errors[0]).toBe('a.yaml:2:6: empty selector (at identities.a) (give one of: unit, slice, cgroup, flatpak, user, group)');
    expect(errors[1]).toMatch(/^a\.yaml:3:6: a selector has one kind, not user and group/);
  });

  it('unknown catalogue category', () => {
    expect(errorsOf({ 'a.yaml': 'deny:\n  - to: ["catalogue:telemetri"]\n' })[0]).toBe(
      'a.yaml:2:10: unknown catalogue category or entry "telemetri" (categories: telemetry, crash-reports, connectivity-checks, news, update-checks, location)',
    );
  });

  it('unreadable file (a dangling link) and unreadable list file', () => {
    expect(errorsOf({ 'a.yaml': { symlink: '/nonexistent/egressd' } })).toEqual(['a.yaml:1:1: cannot read file: ENOENT']);
    expect(errorsOf({ 'a.yaml': 'lists:\n  l: {file: missing.txt}\n' })).toEqual(['a.yaml:2:13: list "l": cannot read missing.txt: ENOENT']);
  });

  it('a 10 MB garbage file is refused by its size, quickly', () => {
    const garbage = new Uint8Array(10 * 1024 * 1024).map((_, i) => 33 + ((i * 7919) % 90));
    const started = performance.now();
    expect(errorsOf({ 'a.yaml': garbage })).toEqual([
      'a.yaml:1:1: file is 10485760 bytes; a policy file is at most 1048576 bytes (put long name lists in a list file (lists: NAME: {file: ...}))',
    ]);
    expect(performance.now() - started).toBeLessThan(5_000);
  });

  it('garbage just under the size limit is an error, not a hang', () => {
    let text = '';
    for (let i = 0; text.length < 1000 * 1024; i++) text += `${'{['[i % 2]}key${i}: "${'x'.repeat(i % 50)}\n`;
    expect(errorsOf({ 'a.yaml': text })[0]).toMatch(/^a\.yaml:\d+:\d+: YAML: /);
  });

  it('a binary file, and a binary or non-UTF-8 list', () => {
    expect(errorsOf({ 'a.yaml': new Uint8Array([0x61, 0x3a, 0x0a, 0x00, 0xff]) })).toEqual(['a.yaml:2:1: file is binary (it contains a NUL byte), not YAML']);
    expect(errorsOf({ 'a.yaml': new Uint8Array([0x61, 0x3a, 0x20, 0xff, 0xfe]) })).toEqual(['a.yaml:1:1: file is not valid UTF-8 text']);
    expect(errorsOf({ 'a.yaml': 'lists:\n  l: {file: l.bin}\n', 'l.bin': new Uint8Array([1, 0, 2]) })).toEqual([
      'a.yaml:2:13: list "l": l.bin is binary (it contains a NUL byte)',
    ]);
  });

  it('a file name that cannot go into rule ids, and the root slice', () => {
    expect(errorsOf({ 'ok.yaml': 'defaults: {egress: deny}\n', 'bad "name".yaml': 'defaults: {egress: allow}\n' })).toEqual([
      'bad "name".yaml:1:1: unusable policy file name (use letters, digits, ".", "_" and "-", at most 64 characters, e.g. 90-local.yaml)',
    ]);
    expect(errorsOf({ 'a.yaml': 'identities: {all: {slice: "-.slice"}}\n' })[0]).toMatch(/^a\.yaml:1:19: the root slice "-\.slice" holds every process/);
  });

  it("a unit runs where systemd puts it: an instance of a template in its template's slice, unless the policy gives the slice", () => {
    const { policy } = loadPolicyOrThrow(
      policyDir({
        'a.yaml': `identities:
  plain: {unit: cups.service}
  getty: {unit: getty@tty1.service}
  agent: {unit: vault-agent@alice.service}
  placed: {unit: vault-agent@alice.service, slice: machine-vm.slice}
  dotted: {unit: .hidden-x@a.b.service}
  every: {cgroup: 'system.slice/system-vault\\x2dagent.slice/vault-agent@*.service'}
`,
      }),
    );
    const glob = (name: string) => policy.identities.get(name)!.selectors[0];
    expect(glob('plain')).toMatchObject({ glob: 'system.slice/cups.service', level: 2 });
    expect(glob('getty')).toMatchObject({ glob: 'system.slice/system-getty.slice/getty@tty1.service', level: 3 });
    // The part before "@" escaped as systemd escapes a unit name: "-" would nest a slice, so it is \x2d.
    expect(glob('agent')).toMatchObject({
      glob: 'system.slice/system-vault\\x2dagent.slice/vault-agent@alice.service',
      level: 3,
      unit: 'vault-agent@alice.service',
    });
    // Slice= in the unit's file: the policy says so with slice, and that is where it runs.
    expect(glob('placed')).toMatchObject({ glob: 'machine.slice/machine-vm.slice/vault-agent@alice.service', level: 3 });
    // A leading "." is escaped too.
    expect(glob('dotted')).toMatchObject({ glob: 'system.slice/system-\\x2ehidden\\x2dx.slice/.hidden-x@a.b.service' });
    // The glob the hint below gives, in single quotes, matches every instance.
    const every = glob('every') as { glob: string };
    expect(cgroupGlobMatcher(every.glob)('system.slice/system-vault\\x2dagent.slice/vault-agent@alice.service')).toBe(true);
  });

  it('a template unit, which never runs, and a scope with an instance are refused: a member so written would match nothing', () => {
    const errors = errorsOf({
      'a.yaml': 'systemDomains:\n  d: {members: [{unit: vault-agent@.service}, {unit: getty@.service}, {unit: a@b.scope}, {unit: "@x.service"}]}\n',
    });
    expect(errors).toEqual([
      `a.yaml:2:24: "vault-agent@.service" is a template, which never runs: only its instances do (at systemDomains.d.members[0].unit) (name an instance, e.g. vault-agent@NAME.service, or match every instance by cgroup: cgroup: 'system.slice/system-vault\\x2dagent.slice/vault-agent@*.service' (single quotes keep its backslashes))`,
      'a.yaml:2:54: "getty@.service" is a template, which never runs: only its instances do (at systemDomains.d.members[1].unit) (name an instance, e.g. getty@NAME.service, or match every instance by cgroup: cgroup: "system.slice/system-getty.slice/getty@*.service")',
      'a.yaml:2:78: "a@b.scope" can never run: a scope has no instances, and systemd refuses "@" in its name (at systemDomains.d.members[2].unit) (name the scope as it runs)',
      'a.yaml:2:97: "@x.service" names no template before its "@" (at systemDomains.d.members[3].unit) (an instance is TEMPLATE@INSTANCE.service)',
    ]);
  });

  it('an inline list entry that is not a name is reported at that entry', () => {
    expect(errorsOf({ 'a.yaml': 'lists:\n  l:\n    names:\n      - a.example.org\n      - 10.0.0.0/8\n' })).toEqual([
      'a.yaml:5:9: "10.0.0.0/8" is not a name; an inline list holds names and *.suffixes (addresses go in a list file)',
    ]);
  });

  it('an empty directory', () => {
    expect(errorsOf({ 'notes.txt': 'x' })).toEqual(['.:1:1: no policy files (*.yaml) in the directory (start from the shipped policies/ directory)']);
  });

  it('reports every problem at once, across files', () => {
    const errors = errorsOf({
      '10-a.yaml': 'defaults: {egress: maybe}\n',
      '20-b.yaml': 'apps:\n  Bad Name: {identity: x}\n',
      '30-c.yaml': 'deny:\n  - to: [256.1.1.1]\n',
    });
    expect(errors.map((e) => e.split(':')[0])).toEqual(['10-a.yaml', '20-b.yaml', '30-c.yaml']);
  });

  it('loadPolicyOrThrow carries every formatted problem in an EGD_POLICY_INVALID error', () => {
    const dir = policyDir({ 'a.yaml': 'defaults: {egress: maybe}\n' });
    expect(() => loadPolicyOrThrow(dir)).toThrow(expect.objectContaining({ code: 'EGD_POLICY_INVALID', details: [expect.stringContaining('a.yaml:1:20: ')] }));
  });

  it('an IPv4 address written another way is not a name: refused with the dotted-decimal form to write', () => {
    expect(errorsOf({ 'a.yaml': 'deny:\n  - to: [a.example, 0x0a.0.0.1, "10.1"]\n' })).toEqual([
      'a.yaml:2:21: "0x0a.0.0.1" is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1 (at deny[0].to[1])',
      'a.yaml:2:33: "10.1" is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1 (at deny[0].to[2])',
    ]);
  });

  it('list lines that resolvers read as addresses, or that are not valid IDNs, are skipped with file:line; IDNs are kept as punycode', () => {
    const dir = policyDir({
      'a.yaml': 'lists:\n  l: {file: l.txt}\ndeny:\n  - to: ["@l"]\n',
      'l.txt': 'münchen.example\n0x0a.0.0.1\nxn--bcher-kva.example\n167772161\nab\u200d.example\n',
    });
    const result = loadPolicyDir(dir);
    expect(result.ok).toBe(true);
    if (!result.ok) return;
    expect([...result.policy.lists.get('l')!.names]).toEqual(['xn--mnchen-3ya.example', 'xn--bcher-kva.example']);
    expect(result.warnings.map((w) => formatIssue(w))).toEqual([
      'l.txt:2:1: warning: skipped "0x0a.0.0.1": it is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1',
      'l.txt:4:1: warning: skipped "167772161": "167772161" is an IPv4 address in a form nft and resolvers read differently; write 10.0.0.1',
      'l.txt:5:1: warning: skipped "ab\u200d.example": it has characters that are not a valid internationalised (IDNA) name',
    ]);
  });

  it('no error or warning quotes more than a bounded piece of the input, whatever its source', () => {
    const big = 'x'.repeat(1_000_000 - 100);
    const files = {
      destination: `deny:\n  - to: ["${big}"]\n`,
      address: `deny:\n  - to: ["${'1.'.repeat(400_000)}1"]\n`,
      port: `deny:\n  - to: [a.example]\n    ports: ["${big}"]\n`,
      socks: `tor: {socks: "${big}"}\n`,
      listFile: `lists:\n  l: {file: "${big}"}\n`,
      inlineList: `lists:\n  l: {names: ["@${big}"]}\n`,
      alias: `a: *${big}\n`,
      unknownKey: `{"${big}": 1}\n`,
      invalidKey: `lists: {"${big}": {names: [a.example]}}\n`,
      garbage: Array.from({ length: 999_000 }, (_, i) => String.fromCharCode(33 + ((i * 7919) % 90))).join(''),
    };
    for (const [name, text] of Object.entries(files)) {
      const dir = policyDir({ 'a.yaml': text, 'l.txt': `${big}\n${big} ${big}\n` });
      const result = loadPolicyDir(dir);
      const issues = [...(result.ok ? [] : result.errors), ...result.warnings];
      expect(issues.length, name).toBeGreaterThan(0);
      for (const issue of issues) expect(formatIssue(issue).length, `${name}: ${formatIssue(issue).slice(0, 100)}`).toBeLessThan(600);
    }
    const list = loadPolicyDir(policyDir({ 'a.yaml': 'lists:\n  l: {file: l.txt}\n', 'l.txt': `${big}\n${big} ${big}\n0.0.0.0 ${big}\n` }));
    expect(list.warnings.length).toBe(4);
    for (const issue of list.warnings) expect(formatIssue(issue).length).toBeLessThan(300);
  });
});
