import { describe, expect, it } from 'vitest';
import { compile, factsNeeded, refuseCompileErrors, type Facts } from '../../src/compile/compile.js';
import { renderText } from '../../src/compile/ruleset.js';
import { EgressError, ErrorCode } from '../../src/errors.js';
import { formatIssue } from '../../src/policy/issues.js';
import { policyJsonSchema } from '../../src/policy/schema.js';
import { resolvePolicy } from '../../src/policy/resolve.js';
import { gatherFacts } from '../../src/system/facts.js';
import { getentLookup, libcLookup, type NameLookup } from '../../src/system/nss.js';
import { compileYaml, FACTS, policyFrom } from '../support/compile-text.js';

const errorsOf = (yaml: string, facts: Facts = FACTS) => compileYaml(yaml, { facts }).errors.map((e) => `${e.at.line}:${e.at.col} ${e.message}`);
const warningsOf = (yaml: string, facts: Facts = FACTS) => compileYaml(yaml, { facts }).warnings.map((w) => `${w.at.line}:${w.at.col} ${w.message}`);

describe('identities that match nothing on this machine', () => {
  it('a system domain member whose user does not exist is an error at its line, not a warning', () => {
    const yaml = 'systemDomains:\n  offline:\n    members:\n      - {user: vault}\n      - {user: ghost}\n';
    expect(errorsOf(yaml)).toEqual(['5:9 user "ghost" of system domain offline does not exist on this machine; it would match nothing and be let out']);
    expect(warningsOf(yaml)).toEqual([]);
    const compiled = compileYaml(yaml);
    expect(compiled.errors[0]!.hint).toContain('{user: ghost, optional: true}');
  });

  it('… and so is a group, and a member named through identities (reported where the name is written)', () => {
    expect(errorsOf('systemDomains: {offline: {members: [{group: nogroup-here}]}}\n')).toEqual([
      '1:37 group "nogroup-here" of system domain offline does not exist on this machine; it would match nothing and be let out',
    ]);
    expect(errorsOf('identities:\n  backup: {user: ghost}\nsystemDomains: {offline: {members: [backup]}}\n')).toEqual([
      '2:3 user "ghost" of system domain offline does not exist on this machine; it would match nothing and be let out',
    ]);
  });

  it('optional: true makes a missing member a warning, and the domain keeps its other members', () => {
    const compiled = compileYaml('systemDomains: {offline: {members: [{user: vault}, {user: ghost, optional: true}]}}\n');
    expect(compiled.errors).toEqual([]);
    expect(compiled.warnings.map((w) => w.message)).toEqual([
      'user "ghost" of system domain offline does not exist on this machine; its rules match nothing until it does',
    ]);
    expect(compiled.ruleset.sets.find((s) => s.name === 'sd_uid')?.elements).toEqual([990]);
  });

  it("Tor's user is an error while updates over Tor are on, a warning when optional, and not looked at while off", () => {
    expect(errorsOf('tor: {enabled: true, user: no-tor}\n')).toEqual([
      '1:28 Tor\'s user "no-tor" does not exist on this machine; it would match nothing and be let out',
    ]);
    expect(errorsOf('tor: {enabled: true, user: {user: no-tor, optional: true}}\n')).toEqual([]);
    expect(errorsOf('tor: {enabled: false, user: no-tor}\n')).toEqual([]);
    // The default user, debian-tor, is an error too where it does not exist; reported where Tor is switched on.
    expect(errorsOf('tor: {enabled: true}\n', { ...FACTS, users: new Map() })).toEqual([
      '1:16 Tor\'s user "debian-tor" does not exist on this machine; it would match nothing and be let out',
    ]);
  });

  it('an app identity or a Tor updater that matches nothing stays a warning that names it (one policy for several machines)', () => {
    expect(errorsOf('identities: {apt: {user: _nobody}}\napps: {web: {identity: {user: ghost}}}\ntor: {enabled: true, updaters: [apt]}\n')).toEqual([]);
    expect(warningsOf('identities: {apt: {user: _nobody}}\napps: {web: {identity: {user: ghost}}}\ntor: {enabled: true, updaters: [apt]}\n')).toEqual([
      '1:14 user "_nobody" of Tor updaters does not exist on this machine; its rules match nothing until it does',
      '2:24 user "ghost" of app web does not exist on this machine; its rules match nothing until it does',
    ]);
  });

  it('a lookup that failed is an error wherever the name is used, optional or not: nobody can tell whether it exists', () => {
    const facts: Facts = { ...FACTS, users: new Map([['alice', { error: 'getpwnam_r failed: EIO' }]]) };
    expect(errorsOf('apps: {web: {identity: {user: alice}}}\nsystemDomains: {off: {members: [{user: alice, optional: true}]}}\n', facts)).toEqual([
      '2:33 cannot look up user "alice": getpwnam_r failed: EIO',
    ]);
    expect(errorsOf('apps: {web: {identity: {user: alice}}}\n', facts)).toEqual(['1:24 cannot look up user "alice": getpwnam_r failed: EIO']);
    // The name service's fault, not the policy's: its own code (exit 3), which lockdown still falls back from.
    const failed = compileYaml('apps: {web: {identity: {user: alice}}}\n', { facts });
    expect(failed.lookupFailed).toBe(true);
    expect(() => refuseCompileErrors(failed, 'p')).toThrow(expect.objectContaining({ code: ErrorCode.NameLookup }));
    const missing = compileYaml('systemDomains: {off: {members: [{user: ghost}]}}\n');
    expect(missing.lookupFailed).toBe(false);
    expect(() => refuseCompileErrors(missing, 'p')).toThrow(expect.objectContaining({ code: ErrorCode.PolicyInvalid }));
  });

  it('a user known only to the caller (through NSS) is in the uid map; numeric ids need no lookup', () => {
    const facts: Facts = { users: new Map([['dynamic-svc', 61234]]), groups: new Map(), cgroups: [] };
    const compiled = compileYaml('systemDomains: {offline: {members: [{user: dynamic-svc}, {user: 4242}, {group: 77}]}}\n', { facts });
    expect(compiled.errors).toEqual([]);
    expect(renderText(compiled.ruleset)).toMatch(/map sd_uid \{[^}]*elements = \{ 4242 : goto sd_offline, 61234 : goto sd_offline \}/);
    expect(compiled.ruleset.sets.find((s) => s.name === 'sd_gid')?.elements).toEqual([77]);
  });

  it('refuseCompileErrors throws EGD_POLICY_INVALID listing each error as dir/file:line:col; nothing to refuse is silent', () => {
    const compiled = compileYaml('systemDomains: {offline: {members: [{user: ghost}]}}\napps: {web: {identity: {user: ghost2}}}\n');
    let thrown: unknown;
    try {
      refuseCompileErrors(compiled, '/etc/egressd');
    } catch (error) {
      thrown = error;
    }
    expect(thrown).toBeInstanceOf(EgressError);
    expect((thrown as EgressError).code).toBe(ErrorCode.PolicyInvalid);
    expect((thrown as EgressError).details).toEqual([
      `/etc/egressd/f.yaml:1:37: user "ghost" of system domain offline does not exist on this machine; it would match nothing and be let out (create it or correct the name; if the name service that knows it (LDAP, sssd, homed) is down, bring it up: it may have answered "not found". Write {user: ghost, optional: true} only where the name may truly be missing)`,
      '/etc/egressd/f.yaml:2:24: warning: user "ghost2" of app web does not exist on this machine; its rules match nothing until it does',
    ]);
    expect(() => refuseCompileErrors(compileYaml('apps: {web: {identity: {user: alice}}}\n'), '/etc/egressd')).not.toThrow();
  });

  it("factsNeeded names every user and group the policy mentions by name, and Tor's user only while Tor is on; those named by number apart", () => {
    const yaml =
      'identities: {apt: {user: _apt}, n: {user: 7}}\napps: {web: {identity: [{user: alice}, {group: wheel}]}}\nsystemDomains: {off: {members: [{user: vault}, {group: 12}]}}\ntor: {enabled: ENABLED, updaters: [apt]}\n';
    expect(factsNeeded(policyFrom(yaml.replace('ENABLED', 'true')))).toEqual({
      users: ['_apt', 'alice', 'debian-tor', 'vault'],
      groups: ['wheel'],
      userIds: [7],
      groupIds: [12],
      cgroupDepth: 0,
      // A system domain has members found by user or group: the table drops SYN-ACKs sent from no socket (synCookieGuard).
      tcpSyncookies: true,
    });
    expect(factsNeeded(policyFrom(yaml.replace('ENABLED', 'false'))).users).toEqual(['_apt', 'alice', 'vault']);
    expect(factsNeeded(policyFrom('systemDomains: {off: {members: [{unit: gpg.service}]}}\n'))).not.toHaveProperty('tcpSyncookies');
  });
});

describe('the optional key in the policy file', () => {
  const errors = (yaml: string) => {
    const result = resolvePolicy([{ file: 'f.yaml', bytes: new TextEncoder().encode(yaml) }], () => ({ error: 'none' }));
    return result.ok ? [] : result.errors.map((e) => formatIssue(e));
  };

  it('is taken by user and group selectors and by tor.user, and refused on a unit (which is matched when it appears)', () => {
    expect(
      errors('systemDomains: {off: {members: [{user: a, optional: true}, {group: b, optional: false}]}}\ntor: {user: {user: c, optional: true}}\n'),
    ).toEqual([]);
    expect(errors('apps: {a: {identity: {unit: a.service, optional: true}}}\n')).toEqual([
      'f.yaml:1:22: "optional" applies to a user or group selector (at apps.a.identity) (a unit, slice, cgroup or Flatpak app that does not exist yet is matched when it appears)',
    ]);
    expect(errors('tor: {user: {user: c, optional: true, extra: 1}}\n')[0]).toContain('unknown key "extra"');
  });

  it('is described in the JSON Schema egressctl schema prints', () => {
    const text = JSON.stringify(policyJsonSchema());
    expect(text).toContain('With user or group: the name may be missing on this machine.');
    expect(text).toContain('{user: NAME, optional: true}');
  });
});

describe('looking names up through NSS', () => {
  it('libc: root is 0, a missing name is undefined, and a buffer too small is grown (ERANGE) rather than failing', () => {
    for (const lookup of [libcLookup(), libcLookup({ firstBuffer: 8 })]) {
      if (lookup instanceof Error) throw lookup;
      expect(lookup('user', 'root')).toBe(0);
      expect(lookup('group', 'root')).toBe(0);
      expect(lookup('user', 'egd-no-such-user')).toBeUndefined();
      expect(lookup('group', 'egd-no-such-group')).toBeUndefined();
    }
  });

  it('getent: the same answers; a getent that cannot run is a failed lookup, not a missing name', () => {
    const lookup = getentLookup();
    expect(lookup('user', 'root')).toBe(0);
    expect(lookup('group', 'root')).toBe(0);
    expect(lookup('user', 'egd-no-such-user')).toBeUndefined();
    expect(getentLookup('/nonexistent/getent')('user', 'root')).toEqual({ error: expect.stringContaining('ENOENT') });
  });

  it('gatherFacts looks up exactly the names needed, keeps failures apart from misses, and looks nothing up when there is nothing to look up', () => {
    const asked: string[] = [];
    const lookup: NameLookup = (kind, name) => {
      asked.push(`${kind}:${name}`);
      return name === 'alice' ? 1000 : name === 'broken' ? { error: 'EIO' } : undefined;
    };
    const facts = gatherFacts({ users: ['alice', 'ghost', 'broken'], groups: ['wheel'], cgroupDepth: 0 }, { lookup, files: NO_FILES });
    expect(asked).toEqual(['user:alice', 'user:ghost', 'user:broken', 'group:wheel']);
    expect([...facts.users]).toEqual([
      ['alice', 1000],
      ['broken', { error: 'EIO' }],
    ]);
    expect([...facts.groups]).toEqual([]);
    const none = gatherFacts(
      { users: [], groups: [], cgroupDepth: 0 },
      {
        lookup: () => {
          throw new Error('looked up');
        },
      },
    );
    expect(none.users.size + none.groups.size).toBe(0);
  });
});

/** Subordinate-id and nsswitch files that are not there: a test must not read the machine's own. */
const NO_FILES = { subuid: '/nonexistent/subuid', subgid: '/nonexistent/subgid', nsswitch: '/nonexistent/nsswitch.conf' };

// The compile of a policy mentioning no names must stay as it was: no lookup, no new issue.
it('a policy without users or groups compiles without errors or warnings', () => {
  const compiled = compile(policyFrom('deny: [{to: [192.0.2.0/24]}]\n'), { users: new Map(), groups: new Map(), cgroups: [] });
  expect([compiled.errors, compiled.warnings]).toEqual([[], []]);
});
