import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FACTS, policyFrom } from '../support/compile-text.js';
import { accountFilesToWatch, gatherFacts } from '../../src/system/facts.js';
import { getentAccounts, libcAccounts, type Accounts, type GroupRow, type NameLookup, type PasswdRow } from '../../src/system/nss.js';
import { compile } from '../../src/compile/compile.js';
import { groupsOfUser } from '../../src/system/sockets.js';
import { parseSubordinate } from '../../src/system/subordinate.js';

const work = mkdtempSync(join(tmpdir(), 'egd-members-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

/** A machine of a few users and groups, as NSS would list it. */
const PASSWD: PasswdRow[] = [
  { name: 'alice', uid: 1000, gid: 1000 },
  { name: 'ally', uid: 1000, gid: 1000 },
  { name: 'bob', uid: 1001, gid: 50 },
  { name: 'carol', uid: 1002, gid: 1002 },
];
const GROUPS: GroupRow[] = [
  { name: 'staff', gid: 50, members: ['carol', 'gone'] },
  { name: 'alice', gid: 1000, members: [] },
];
const lookup: NameLookup = (kind, name) => (kind === 'user' ? PASSWD.find((u) => u.name === name)?.uid : GROUPS.find((g) => g.name === name)?.gid);
const accounts = (overrides: Partial<Accounts> = {}): Accounts => ({
  user: (key) => PASSWD.find((u) => u.name === key || u.uid === key),
  group: (key) => GROUPS.find((g) => g.name === key || g.gid === key),
  everyUser: () => PASSWD,
  groupsOf: (name, gid) => [gid, ...GROUPS.filter((g) => g.members.includes(name)).map((g) => g.gid)],
  ...overrides,
});
const files = (subuid: string, subgid: string, nsswitch = 'passwd: files systemd\n') => {
  const dir = mkdtempSync(join(work, 'f-'));
  writeFileSync(join(dir, 'subuid'), subuid);
  writeFileSync(join(dir, 'subgid'), subgid);
  writeFileSync(join(dir, 'nsswitch.conf'), nsswitch);
  return { subuid: join(dir, 'subuid'), subgid: join(dir, 'subgid'), nsswitch: join(dir, 'nsswitch.conf') };
};

describe('subordinate ids', () => {
  it('parses owner:start:count as newuidmap does; a line it refuses is skipped with a warning at file:line', () => {
    const text = [
      'alice:100000:65536',
      '',
      '# a comment',
      '1001:200000:10',
      'bob:1:2:3',
      'bob:x:10',
      'bob:10:0',
      'bob:4294967290:10',
      ':5:5',
      'carol:300000:1',
    ].join('\n');
    const { lines, warnings, refused } = parseSubordinate(text, '/etc/subuid');
    // Read by newuidmap (shadow 4.13, tried): a fourth field is ignored; a range past 2^32 - 2 keeps the ids that exist.
    expect(lines).toEqual([
      { owner: 'alice', line: 1, from: 100000, to: 165535 },
      { owner: '1001', line: 4, from: 200000, to: 200009 },
      { owner: 'bob', line: 5, from: 1, to: 2 },
      { owner: 'bob', line: 8, from: 4294967290, to: 4294967294 },
      { owner: 'carol', line: 10, from: 300000, to: 300000 },
    ]);
    expect(warnings.map((w) => `${w.at.file}:${w.at.line}:${w.at.col} ${w.message}`)).toEqual([
      '/etc/subuid:6:1 subordinate id line skipped: start "x" is not a number',
      '/etc/subuid:7:1 subordinate id line covers no id a process can have',
      '/etc/subuid:9:1 subordinate id line skipped: no owner',
    ]);
    expect(refused).toEqual([
      { owner: 'bob', line: 6, why: 'start "x" is not a number' },
      { owner: '', line: 9, why: 'no owner' },
    ]);
  });

  it("reads start and count as newuidmap's strtoul(…, 0) does, with its 64-bit wrap: each case below was tried on the real newuidmap", () => {
    const cases: [string, [number, number] | 'none' | 'refused'][] = [
      ['u:0x186a0:010', [100000, 100007]],
      ['u:0303240:2', [100000, 100001]],
      ['u:0x10:0X2', [16, 17]],
      ['u: +100000:1', [100000, 100000]],
      ['u:\t16:1', [16, 16]],
      ['u:-0:1', [0, 0]],
      // A count of 0 at 0 wraps to every id; a count of -1 to every id from start: newuidmap maps them (tried).
      ['u:0:0', [0, 4294967294]],
      ['u:1:-1', [1, 4294967294]],
      ['u:4294967294:2', [4294967294, 4294967294]],
      ['u:1:0', 'none'],
      ['u:4294967295:1', 'none'],
      ['u:-1:1', 'none'],
      ['u:08:1', 'refused'],
      ['u:0x:1', 'refused'],
      ['u:100000:1 ', 'refused'],
      ['u:100000:1\r', 'refused'],
      ['u:99999999999999999999:1', 'refused'],
      ['u:1', 'refused'],
      ['u::1', 'refused'],
      ['+u:100000:1', 'refused'],
      // 1024 bytes: longer than shadow's line buffer takes (1023 is read, below).
      [`u:1:${'0'.repeat(1019)}1`, 'refused'],
    ];
    for (const [line, expected] of cases) {
      const parsed = parseSubordinate(`${line}\n`, 'f');
      const got = parsed.lines.length > 0 ? [parsed.lines[0]!.from, parsed.lines[0]!.to] : parsed.refused.length > 0 ? 'refused' : 'none';
      expect(got, JSON.stringify(line)).toEqual(expected);
    }
    // The owner is not trimmed, and a comment is a line like any other where newuidmap reads one.
    expect(parseSubordinate(' alice:1:1\n#x:5:1\n# a comment\n', 'f').lines.map((l) => l.owner)).toEqual([' alice', '#x']);
    expect(parseSubordinate(`u:1:${'0'.repeat(1018)}1\n`, 'f').lines).toHaveLength(1);
    // A range from 0 lets its owner map root: said, since the owner's identity then holds uid 0 too.
    expect(parseSubordinate('u:0:0\nv:1:5\n', 'f').warnings.map((w) => [w.at.line, w.message])).toEqual([
      [1, 'subordinate ids of "u" include 0: it can map root into its user namespaces, so its identity holds uid 0 too'],
    ]);
  });

  it("gathers each named user's ranges, written with its name, its uid or another name of the same uid, as newuidmap finds them", () => {
    const f = files('alice:100000:65536\nally:300000:5\n1001:200000:10\nzed:400000:5\nbroken line\n', 'alice:100000:65536\n1000:500000:1\n');
    const facts = gatherFacts({ users: ['alice'], groups: [], userIds: [1001, 1002], cgroupDepth: 0 }, { lookup, accounts: accounts(), files: f });
    expect(facts.subordinate).toEqual(
      new Map([
        [
          1000,
          {
            uids: [
              { from: 100000, to: 165535 },
              { from: 300000, to: 300004 },
            ],
            gids: [
              { from: 100000, to: 165535 },
              { from: 500000, to: 500000 },
            ],
          },
        ],
        [1001, { uids: [{ from: 200000, to: 200009 }], gids: [] }],
      ]),
    );
    expect(facts.warnings?.map((w) => `${w.at.file}:${w.at.line} ${w.message}`)).toEqual([
      `${f.subuid}:5 subordinate id line skipped: 1 field, not 3 (owner:start:count)`,
    ]);
  });

  it('newuidmap matches a uid owner as "%lu" prints it: "01000" is not uid 1000', () => {
    const f = files('01000:100000:5\n1000:200000:5\n', '');
    const facts = gatherFacts({ users: ['alice'], groups: [], cgroupDepth: 0 }, { lookup, accounts: accounts(), files: f });
    expect(facts.subordinate?.get(1000)).toEqual({ uids: [{ from: 200000, to: 200004 }], gids: [] });
  });

  it("a line newuidmap refuses that names a policy user (by name, uid or another name of its uid) is an error at file:line for that user; another's stays a warning", () => {
    const f = files('alice:100000:65536\nally:300000:5x\ncarol:400000:1 \n', '01001:0x:1\n');
    const facts = gatherFacts({ users: ['alice', 'bob'], groups: [], cgroupDepth: 0 }, { lookup, accounts: accounts(), files: f });
    expect(facts.subordinate).toEqual(
      new Map([
        [1000, { error: `${f.subuid}:2: a line of this user that newuidmap does not read: count "5x" is not a number` }],
        [1001, { error: `${f.subgid}:1: a line of this user that newuidmap does not read: start "0x" is not a number` }],
      ]),
    );
    expect(facts.warnings?.map((w) => `${w.at.file}:${w.at.line} ${w.message}`)).toEqual([
      `${f.subuid}:3 subordinate id line skipped: count "1 " is not a number`,
    ]);
    const compiled = compile(policyFrom('systemDomains: {offline: {members: [{user: alice}]}}\n'), { ...FACTS, ...facts }, {});
    expect(compiled.errors.map((e) => e.message)).toEqual([
      `cannot read the subordinate ids of user "alice": ${f.subuid}:2: a line of this user that newuidmap does not read: count "5x" is not a number`,
    ]);
  });

  it("an owner name that cannot be looked up makes every named user's ranges unknown: that line may be theirs", () => {
    const f = files('alice:100000:65536\nldapuser:300000:5\n1001:200000:10\n', '');
    const failing: NameLookup = (kind, name) =>
      kind === 'user' && name === 'ldapuser' ? { error: 'getpwnam_r: a name service module in nsswitch.conf is unavailable' } : lookup(kind, name);
    const facts = gatherFacts({ users: ['alice'], groups: [], userIds: [1001], cgroupDepth: 0 }, { lookup: failing, accounts: accounts(), files: f });
    const error = { error: `${f.subuid}:2: the owner ldapuser cannot be looked up: getpwnam_r: a name service module in nsswitch.conf is unavailable` };
    expect(facts.subordinate).toEqual(
      new Map([
        [1000, error],
        [1001, error],
      ]),
    );
    // The compiler refuses, as for a failed name lookup.
    const compiled = compile(policyFrom('systemDomains: {offline: {members: [{user: alice}]}}\n'), { ...FACTS, ...facts }, {});
    expect(compiled.lookupFailed).toBe(true);
    expect(compiled.errors.map((e) => e.message)).toEqual([`cannot read the subordinate ids of user "alice": ${error.error}`]);
  });

  it('files that are not there give no ranges; a file that cannot be read makes the ranges unknown', () => {
    const none = gatherFacts(
      { users: ['alice'], groups: [], cgroupDepth: 0 },
      { lookup, accounts: accounts(), files: { subuid: join(work, 'no-subuid'), subgid: join(work, 'no-subgid'), nsswitch: join(work, 'no-nss') } },
    );
    expect(none.subordinate).toEqual(new Map());
    const unreadable = gatherFacts(
      { users: ['alice'], groups: [], cgroupDepth: 0 },
      { lookup, accounts: accounts(), files: { ...files('', ''), subuid: work } },
    );
    expect(unreadable.subordinate?.get(1000)).toEqual({ error: `${work}: EISDIR` });
  });
});

describe('group members', () => {
  it("lists a group's supplementary members and the users whose primary group it is, by uid; a member that is gone matches nobody", () => {
    const facts = gatherFacts({ users: [], groups: ['staff'], groupIds: [1000], cgroupDepth: 0 }, { lookup, accounts: accounts(), files: files('', '') });
    expect(facts.members).toEqual(
      new Map([
        [50, [1001, 1002]],
        [1000, [1000]],
      ]),
    );
    expect(facts.membersIncomplete).toBeUndefined();
  });

  it("gathers the members' subordinate ranges too, and only theirs: a member's rootless container is still the member", () => {
    const f = files('bob:200000:10\ncarol:300000:5\nalice:100000:65536\n', 'carol:300000:5\n');
    const facts = gatherFacts({ users: [], groups: ['staff'], cgroupDepth: 0 }, { lookup, accounts: accounts(), files: f });
    expect(facts.members?.get(50)).toEqual([1001, 1002]);
    // alice is named by no one and in no group of the policy: her ranges are not read.
    expect(facts.subordinate).toEqual(
      new Map([
        [1001, { uids: [{ from: 200000, to: 200009 }], gids: [] }],
        [1002, { uids: [{ from: 300000, to: 300004 }], gids: [{ from: 300000, to: 300004 }] }],
      ]),
    );
  });

  it('says when a name service may not list its users, and a listing that fails makes the members unknown', () => {
    const f = files('', '', '# sssd\npasswd:   files [NOTFOUND=return] sss systemd ldap # comment\ngroup: files sss\n');
    const facts = gatherFacts({ users: [], groups: ['staff'], cgroupDepth: 0 }, { lookup, accounts: accounts(), files: f });
    expect(facts.membersIncomplete).toBe(`users are also looked up through sss, ldap (${f.nsswitch}), which may not list its users`);
    const failing = gatherFacts(
      { users: [], groups: ['staff'], cgroupDepth: 0 },
      { lookup, accounts: accounts({ everyUser: () => ({ error: 'getpwent_r failed: EIO' }) }), files: f },
    );
    expect(failing.members?.get(50)).toEqual({ error: 'listing users: getpwent_r failed: EIO' });
    const groupFails = gatherFacts(
      { users: [], groups: ['staff'], cgroupDepth: 0 },
      { lookup, accounts: accounts({ group: () => ({ error: 'EIO' }) }), files: f },
    );
    expect(groupFails.members?.get(50)).toEqual({ error: 'EIO' });
  });

  it('the daemon is told which files to watch', () => {
    expect(accountFilesToWatch()).toEqual(['/etc/passwd', '/etc/group', '/etc/subuid', '/etc/subgid', '/etc/nsswitch.conf']);
  });
});

describe('accounts through NSS', () => {
  it('libc (koffi) and getent agree on this machine: entries by name and id, member lists, and every user', () => {
    const libc = libcAccounts({ firstBuffer: 64 });
    if (libc instanceof Error) throw libc;
    const getent = getentAccounts();
    for (const key of ['root', 0, 'egd-no-such-user', 987654]) expect(libc.user(key)).toEqual(getent.user(key));
    const groups = getent.everyUser();
    if ('error' in groups) throw new Error(groups.error);
    expect(libc.everyUser()).toEqual(groups);
    // Every group of the machine, member lists included (the small first buffer makes ERANGE grow it).
    const all = execGroups();
    expect(all.length).toBeGreaterThan(0);
    for (const name of all) expect(libc.group(name)).toEqual(getent.group(name));
    for (const gid of [0, 987654]) expect(libc.group(gid)).toEqual(getent.group(gid));
    expect(getentAccounts('/nonexistent/getent').everyUser()).toEqual({ error: expect.stringContaining('ENOENT') });
  });
});

describe("a uid's groups, for the sweep's orphans", () => {
  it('looked up by uid, never as a name; a uid without a passwd entry (a subordinate uid) has none; a failure is said', () => {
    const asked: string[] = [];
    const fake = accounts({ groupsOf: (name, gid) => (asked.push(`${name} ${gid}`), accounts().groupsOf(name, gid)) });
    expect(groupsOfUser(1002, fake)).toEqual([1002, 50]);
    expect(groupsOfUser(1001, fake)).toEqual([50]);
    expect(asked).toEqual(['carol 1002', 'bob 50']);
    expect(groupsOfUser(100000, fake)).toEqual([]);
    expect(groupsOfUser(1000, accounts({ user: () => ({ error: 'getpwuid_r failed: EIO' }) }))).toEqual({ error: 'uid 1000: getpwuid_r failed: EIO' });
    expect(groupsOfUser(1000, accounts({ groupsOf: () => ({ error: 'EIO' }) }))).toEqual({ error: 'uid 1000: EIO' });
  });

  it('on this machine: libc (getgrouplist) and getent agree with id, for every user; a uid no one has has no groups', () => {
    const libc = libcAccounts();
    if (libc instanceof Error) throw libc;
    const getent = getentAccounts();
    const users = getent.everyUser();
    if ('error' in users) throw new Error(users.error);
    expect(users.length).toBeGreaterThan(0);
    const sorted = (found: readonly number[] | { error: string }) => ('error' in found ? found : [...found].sort((a, b) => a - b));
    for (const user of users) {
      const id = execFileSync('id', ['-G', '--', user.name], { encoding: 'utf8' }).trim().split(/\s+/).map(Number);
      expect(sorted(groupsOfUser(user.uid, libc)), user.name).toEqual(sorted(id));
      expect(sorted(groupsOfUser(user.uid, getent)), user.name).toEqual(sorted(id));
    }
    expect(groupsOfUser(3999999, libc)).toEqual([]);
    expect(groupsOfUser(3999999, getent)).toEqual([]);
  });
});

/** The machine's group names, from getent. */
function execGroups(): string[] {
  const listed = getentAccounts();
  const names: string[] = [];
  for (const key of ['root', 'adm', 'sudo', 'ssl-cert', 'users', 'nogroup']) {
    const found = listed.group(key);
    if (found && !('error' in found)) names.push(found.name);
  }
  return names;
}
