import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import {
  checkCapabilities,
  confinedMembers,
  decideHeldCapabilities,
  netCapabilities,
  parseProcCgroup,
  parseProcStatus,
  unitHolds,
  type CapabilityProbe,
  type TaskReading,
  type UnitConfig,
} from '../../src/system/capabilities.js';
import { parseValue, systemCapabilityProbe } from '../../src/system/capability-probe.js';
import { FACTS, policyFrom } from '../support/compile-text.js';
import { runEgressctl } from '../support/cli-run.js';
import { policyDir } from '../support/policy-dir.js';

/** A /proc status file as Linux 6.x prints it, with the fields that matter given. */
function status(o: { name?: string; uid?: number[]; gid?: number[]; groups?: number[]; eff?: string; prm?: string; kthread?: boolean } = {}): string {
  return [
    `Name:\t${o.name ?? 'sleep'}`,
    'Umask:\t0022',
    'State:\tS (sleeping)',
    'Tgid:\t4242',
    'Pid:\t4242',
    'PPid:\t1',
    `Uid:\t${(o.uid ?? [1000, 1000, 1000, 1000]).join('\t')}`,
    `Gid:\t${(o.gid ?? [1000, 1000, 1000, 1000]).join('\t')}`,
    'FDSize:\t64',
    `Groups:\t${(o.groups ?? []).join(' ')} `,
    `Kthread:\t${o.kthread ? 1 : 0}`,
    'CapInh:\t0000000000000000',
    `CapPrm:\t${o.prm ?? '0000000000000000'}`,
    `CapEff:\t${o.eff ?? '0000000000000000'}`,
    'CapBnd:\t000001ffffffffff',
    'CapAmb:\t0000000000000000',
    'NoNewPrivs:\t0',
    '',
  ].join('\n');
}

const RAW = '0000000000002000';
const ADMIN = '0000000000001000';
const task = (pid: number, cgroup: string | undefined, text: string, tid = pid): TaskReading => ({ pid, tid, cgroup, status: text });

describe('reading /proc', () => {
  it('parses a status file: ids, supplementary groups and the capability masks, as bigints', () => {
    const parsed = parseProcStatus(status({ uid: [0, 990, 990, 990], groups: [10, 27], eff: '000001ffffffffff', prm: RAW }));
    expect(parsed).toEqual({
      ok: true,
      status: {
        name: 'sleep',
        uids: [0, 990, 990, 990],
        gids: [1000, 1000, 1000, 1000],
        groups: [10, 27],
        effective: 0x1ffffffffffn,
        permitted: 0x2000n,
        kernel: false,
      },
    });
  });

  it('names what is odd in a status file instead of throwing', () => {
    expect(parseProcStatus('')).toEqual({ ok: false, problem: 'no Uid line' });
    expect(parseProcStatus(status().replace(/CapEff:.*\n/, ''))).toEqual({ ok: false, problem: 'no CapEff line' });
    expect(parseProcStatus(status().replace(/CapEff:.*\n/, 'CapEff:\tzz12\n'))).toEqual({ ok: false, problem: 'a malformed CapEff line: "zz12"' });
    expect(parseProcStatus(status().replace(/CapPrm:.*\n/, 'CapPrm:\t00000000000000000001\n'))).toMatchObject({
      ok: false,
      problem: expect.stringContaining('CapPrm'),
    });
    expect(parseProcStatus(status().replace(/Uid:.*\n/, 'Uid:\t0\t0\n'))).toEqual({ ok: false, problem: 'a malformed Uid line: "0\\t0"' });
    expect(parseProcStatus('\u0000\u0001garbage:::\n'.repeat(1000))).toEqual({ ok: false, problem: 'no Uid line' });
  });

  it('tells kernel threads apart, by Kthread: where the kernel prints it, else by kthreadd', () => {
    expect(parseProcStatus(status({ kthread: true }))).toMatchObject({ status: { kernel: true } });
    const old = status().replace(/Kthread:.*\n/, '');
    expect(parseProcStatus(old)).toMatchObject({ status: { kernel: false } });
    expect(parseProcStatus(old.replace('PPid:\t1', 'PPid:\t2'))).toMatchObject({ status: { kernel: true } });
  });

  it('finds CAP_NET_ADMIN (bit 12) and CAP_NET_RAW (bit 13) in a mask, all 64 bits of it', () => {
    expect(netCapabilities(0x2000n)).toEqual(['CAP_NET_RAW']);
    expect(netCapabilities(0x1000n)).toEqual(['CAP_NET_ADMIN']);
    expect(netCapabilities(0x3000n)).toEqual(['CAP_NET_ADMIN', 'CAP_NET_RAW']);
    expect(netCapabilities(0xffffffffffffcfffn)).toEqual([]);
    expect(netCapabilities(18446744073709551615n)).toEqual(['CAP_NET_ADMIN', 'CAP_NET_RAW']);
  });

  it('reads the cgroup2 path from /proc/PID/cgroup; none on a cgroup v1-only line set', () => {
    expect(parseProcCgroup('0::/system.slice/cups.service\n')).toBe('system.slice/cups.service');
    expect(parseProcCgroup('12:cpu,cpuacct:/x\n1:name=systemd:/y\n0::/\n')).toBe('');
    expect(parseProcCgroup('12:cpu,cpuacct:/x\n1:name=systemd:/y\n')).toBeUndefined();
  });

  describe('from a /proc tree', () => {
    const proc = mkdtempSync(join(tmpdir(), 'egd-proc-'));
    afterAll(() => rmSync(proc, { recursive: true, force: true }));
    const thread = (pid: number, tid: number, text: string, cgroup = '0::/sys/x.service\n') => {
      mkdirSync(join(proc, `${pid}/task/${tid}`), { recursive: true });
      writeFileSync(join(proc, `${pid}/task/${tid}/status`), text);
      writeFileSync(join(proc, `${pid}/task/${tid}/cgroup`), cgroup);
    };

    it('reads every thread; a process that is gone is skipped, one that cannot be read is a problem', () => {
      thread(10, 10, status());
      thread(10, 11, status({ eff: RAW }));
      mkdirSync(join(proc, '11')); // exited between readdir and read: no task directory
      mkdirSync(join(proc, '12/task/12'), { recursive: true });
      mkdirSync(join(proc, '12/task/12/status')); // a directory where a file should be: EISDIR
      mkdirSync(join(proc, 'self'), { recursive: true });
      const read = systemCapabilityProbe({ procRoot: proc }).tasks();
      expect(read.tasks.map((t) => [t.pid, t.tid, t.cgroup, t.userNs])).toEqual([
        [10, 10, 'sys/x.service', undefined],
        [10, 11, 'sys/x.service', undefined],
      ]);
      expect(read.problems).toEqual([expect.stringMatching(/^capabilities of PID 12 \(thread 12\) not checked: EISDIR/)]);
    });

    it('says so when /proc itself cannot be read', () => {
      const read = systemCapabilityProbe({ procRoot: join(proc, 'nonexistent') }).tasks();
      expect(read.tasks).toEqual([]);
      expect(read.problems).toEqual([expect.stringContaining('running processes not checked')]);
    });
  });

  it('the real /proc: this test process is found, with the capability sets it really has', () => {
    const read = systemCapabilityProbe().tasks();
    const self = read.tasks.find((t) => t.pid === process.pid && t.tid === process.pid);
    expect(self).toBeDefined();
    const mine = readFileSync('/proc/self/status', 'utf8');
    const parsed = parseProcStatus(self!.status);
    expect(parsed.ok).toBe(true);
    expect(parsed.ok && parsed.status.effective).toBe(BigInt(`0x${/CapEff:\s*(\w+)/.exec(mine)![1]}`));
    expect(self!.userNs).toMatch(/^user:\[\d+\]$/);
    expect(read.userNs).toBe(self!.userNs);
  });
});

describe('which confined members hold CAP_NET_RAW or CAP_NET_ADMIN', () => {
  const policy = policyFrom(`
systemDomains:
  offline:
    members:
      - {unit: vault.service}
      - {cgroup: "apps/sealed-*"}
      - {user: vault}
      - {group: wheel}
      - {user: ghost, optional: true}
apps:
  web: {identity: {user: alice}, default: allow}
tor:
  enabled: true
  user: {user: debian-tor, optional: true}
  updaters: [{user: _apt}]
`);
  const members = confinedMembers(policy);
  const decide = (tasks: TaskReading[], problems: string[] = []) => decideHeldCapabilities(members, FACTS, { tasks, problems }, undefined);

  it('the members are the system domains and, with updates over Tor on, the updaters; never an app', () => {
    expect(members.map((m) => `${m.owner}: ${m.selector.kind === 'cgroup' ? m.selector.written : JSON.stringify(m.selector)}`)).toEqual([
      'system domain offline: unit vault.service',
      'system domain offline: cgroup apps/sealed-*',
      'system domain offline: {"kind":"user","user":"vault"}',
      'system domain offline: {"kind":"group","group":"wheel"}',
      'system domain offline: {"kind":"user","user":"ghost","optional":true}',
      'updater tor-updater#1 (over Tor): {"kind":"user","user":"_apt"}',
    ]);
    const off = confinedMembers(policyFrom('tor: {enabled: false, updaters: [{user: _apt}]}\n'));
    expect(off).toEqual([]);
  });

  it('a member by cgroup: its cgroup and those below it, as socket cgroupv2 matches; not a sibling or a process without them', () => {
    const result = decide([
      task(100, 'system.slice/vault.service', status({ name: 'vaultd', uid: [0, 0, 0, 0], eff: RAW, prm: RAW })),
      task(101, 'apps/sealed-1/sub/deeper', status({ name: 'helper', prm: ADMIN })),
      task(102, 'apps/sealed-2', status({ name: 'quiet' })),
      task(103, 'apps/open', status({ name: 'open', eff: RAW })),
      task(104, 'system.slice/vault.service.d', status({ eff: RAW })),
      task(105, undefined, status({ eff: RAW })),
    ]);
    expect(result.warnings.map((w) => [w.at.line, w.message])).toEqual([
      [
        5,
        'system domain offline member unit vault.service is not confined by the table: PID 100 ("vaultd") holds CAP_NET_RAW (AF_PACKET frames never meet the table)',
      ],
      [
        6,
        'system domain offline member cgroup apps/sealed-* is not confined by the table: PID 101 ("helper") holds CAP_NET_ADMIN (it can change or remove the table)',
      ],
    ]);
    expect(result.warnings[0]!.hint).toContain('CapabilityBoundingSet=~CAP_NET_RAW CAP_NET_ADMIN');
    expect(result.warnings[0]!.hint).toContain('RestrictAddressFamilies=~AF_PACKET');
  });

  it('a member by user: any of its real, effective, saved or fs uid; by group: its gids or supplementary groups', () => {
    const result = decide([
      task(200, '', status({ name: 'setuid-ish', uid: [1000, 990, 1000, 1000], eff: RAW })),
      task(201, '', status({ name: 'sg', groups: [10], eff: RAW })),
      task(202, '', status({ name: 'alice', uid: [1000, 1000, 1000, 1000], eff: RAW })),
      task(203, '', status({ name: 'apt', uid: [42, 42, 42, 42], eff: RAW })),
    ]);
    expect(result.warnings.map((w) => w.message)).toEqual([
      'system domain offline member user vault is not confined by the table: PID 200 ("setuid-ish") holds CAP_NET_RAW (AF_PACKET frames never meet the table)',
      'system domain offline member group wheel is not confined by the table: PID 201 ("sg") holds CAP_NET_RAW (AF_PACKET frames never meet the table)',
      'updater tor-updater#1 (over Tor) member user _apt is not confined by the table: PID 203 ("apt") holds CAP_NET_RAW (AF_PACKET frames never meet the table)',
    ]);
  });

  it('a member by user holds its subordinate uids and gids; by group, its members by uid, as the table does (Facts.subordinate, Facts.members)', () => {
    const facts = {
      ...FACTS,
      subordinate: new Map([[990, { uids: [{ from: 200000, to: 265535 }], gids: [{ from: 300000, to: 300009 }] }]]),
      members: new Map([[10, [1001]]]),
    };
    const tasks = [
      task(900, '', status({ name: 'rootless', uid: [200007, 200007, 200007, 200007], gid: [5, 5, 5, 5], eff: RAW })),
      task(901, '', status({ name: 'subgid', uid: [4000, 4000, 4000, 4000], gid: [4000, 4000, 4000, 4000], groups: [300009], eff: RAW })),
      task(902, '', status({ name: 'cleared', uid: [1001, 1001, 1001, 1001], gid: [1001, 1001, 1001, 1001], groups: [], eff: ADMIN })),
      task(903, '', status({ name: 'outside', uid: [265536, 265536, 265536, 265536], gid: [300010, 300010, 300010, 300010], eff: RAW })),
    ];
    expect(decideHeldCapabilities(members, facts, { tasks, problems: [] }, undefined).warnings.map((w) => w.message)).toEqual([
      'system domain offline member user vault is not confined by the table: PID 900 ("rootless") holds CAP_NET_RAW, PID 901 ("subgid") holds CAP_NET_RAW (AF_PACKET frames never meet the table)',
      'system domain offline member group wheel is not confined by the table: PID 902 ("cleared") holds CAP_NET_ADMIN (it can change or remove the table)',
    ]);
    // Without those facts, the same processes are no member.
    expect(decideHeldCapabilities(members, FACTS, { tasks, problems: [] }, undefined).warnings).toEqual([]);
  });

  it('a process holds what any of its threads holds; kernel threads are no member', () => {
    const result = decide([
      task(300, '', status({ name: 'main', uid: [990, 990, 990, 990] })),
      task(300, '', status({ name: 'worker', uid: [990, 990, 990, 990], eff: ADMIN }), 301),
      task(2, '', status({ name: 'kthreadd', uid: [990, 990, 990, 990], eff: RAW, kthread: true })),
    ]);
    expect(result.warnings.map((w) => w.message)).toEqual([
      'system domain offline member user vault is not confined by the table: PID 300 ("main") holds CAP_NET_ADMIN (it can change or remove the table)',
    ]);
  });

  it('names five processes of a member and counts the rest; a name a process chose is quoted and escaped', () => {
    const tasks = Array.from({ length: 8 }, (_, i) =>
      task(400 + i, 'apps/sealed-x', status({ name: i === 0 ? 'a"\u202e\u0085b' : 'x', eff: '0000000000003000' })),
    );
    const [warning] = decide(tasks).warnings;
    expect(warning!.message).toContain('PID 400 ("a\\"\\u202e\\u0085b") holds CAP_NET_ADMIN and CAP_NET_RAW');
    expect(warning!.message).toContain('PID 404 ("x")');
    expect(warning!.message).not.toContain('PID 405');
    expect(warning!.message).toContain('and 3 more processes (it can change or remove the table; AF_PACKET frames never meet the table)');
  });

  it('odd /proc content is a problem named by PID, never a crash, and the rest is still checked; problems are bounded', () => {
    const odd = Array.from({ length: 9 }, (_, i) => task(500 + i, '', 'Uid:\tnot numbers\n'));
    const result = decide([...odd, task(600, 'apps/sealed-9', status({ eff: RAW }))], ['running processes not checked: x']);
    expect(result.warnings).toHaveLength(1);
    expect(result.problems).toEqual([
      'running processes not checked: x',
      'capabilities of PID 500 not checked: its /proc status has a malformed Uid line: "not numbers"',
      'capabilities of PID 501 not checked: its /proc status has a malformed Uid line: "not numbers"',
      'capabilities of PID 502 not checked: its /proc status has a malformed Uid line: "not numbers"',
      'capabilities of PID 503 not checked: its /proc status has a malformed Uid line: "not numbers"',
      'and 5 more such problems',
    ]);
  });

  it("capabilities count in the check's own user namespace only; where either link is unknown, they count", () => {
    const inner = { ...task(800, 'apps/sealed-1', status({ name: 'container', eff: '000001ffffffffff' })), userNs: 'user:[4026533293]' };
    const host = { ...task(801, 'apps/sealed-1', status({ name: 'host', eff: RAW })), userNs: 'user:[4026531837]' };
    const unknown = task(802, 'apps/sealed-1', status({ name: 'unknown', eff: RAW }));
    const check = (userNs?: string) =>
      decideHeldCapabilities(members, FACTS, { tasks: [inner, host, unknown], problems: [], ...(userNs && { userNs }) }, undefined).warnings.map(
        (w) => w.message,
      );
    expect(check('user:[4026531837]')).toEqual([expect.stringMatching(/: PID 801 \("host"\) holds CAP_NET_RAW, PID 802 \("unknown"\) holds CAP_NET_RAW \(/)]);
    expect(check(undefined)[0]).toContain('PID 800 ("container") holds CAP_NET_ADMIN and CAP_NET_RAW');
  });

  it('a process that holds neither, or could only gain them (bounding set), is no finding', () => {
    expect(decide([task(700, 'apps/sealed-1', status({ eff: '0000000000000000', prm: '0000000000000000' }))]).warnings).toEqual([]);
  });

  describe('units, as systemd would start them', () => {
    const unit = (o: Partial<UnitConfig>): UnitConfig => ({
      loadState: 'loaded',
      user: '',
      dynamicUser: false,
      boundingSet: 0xffffffffffffffffn,
      ambient: 0n,
      privateNetwork: false,
      ...o,
    });

    it('root with either in its bounding set holds it; a user holds only what AmbientCapabilities gives within the bounding set', () => {
      expect(unitHolds(unit({}))).toEqual({
        caps: ['CAP_NET_ADMIN', 'CAP_NET_RAW'],
        because: 'it runs as root and CapabilityBoundingSet keeps CAP_NET_ADMIN and CAP_NET_RAW',
      });
      expect(unitHolds(unit({ user: 'root', boundingSet: 0x2000n }))).toMatchObject({ caps: ['CAP_NET_RAW'] });
      expect(unitHolds(unit({ user: '0', boundingSet: ~0x3000n & 0xffffffffffffffffn }))).toBeUndefined();
      expect(unitHolds(unit({ user: 'vault' }))).toBeUndefined();
      expect(unitHolds(unit({ user: 'vault', ambient: 0x2000n }))).toEqual({
        caps: ['CAP_NET_RAW'],
        because: 'AmbientCapabilities gives user vault CAP_NET_RAW',
      });
      expect(unitHolds(unit({ user: 'vault', ambient: 0x2000n, boundingSet: 0n }))).toBeUndefined();
      expect(unitHolds(unit({ dynamicUser: true }))).toBeUndefined();
    });

    it('a unit that is not installed, or has a network namespace of its own, is no finding', () => {
      expect(unitHolds(unit({ loadState: 'not-found' }))).toBeUndefined();
      expect(unitHolds(unit({ privateNetwork: true }))).toBeUndefined();
    });

    it('a warning for the unit, a problem for a D-Bus error, one note when systemd cannot be asked', () => {
      const units = new Map([['vault.service', unit({ user: 'root', boundingSet: 0x2000n })]]);
      const found = decideHeldCapabilities(members, FACTS, { tasks: [], problems: [] }, { available: true, units });
      expect(found.warnings.map((w) => [w.at.line, w.message, w.hint])).toEqual([
        [
          5,
          'system domain offline member unit vault.service: systemd starts vault.service with CAP_NET_RAW (it runs as root and CapabilityBoundingSet keeps CAP_NET_RAW), so it is not confined by the table (AF_PACKET frames never meet the table)',
          'add to it with "systemctl edit vault.service": CapabilityBoundingSet=~CAP_NET_RAW CAP_NET_ADMIN, AmbientCapabilities=, RestrictAddressFamilies=~AF_PACKET',
        ],
      ]);
      const failed = decideHeldCapabilities(
        members,
        FACTS,
        { tasks: [], problems: [] },
        { available: true, units: new Map([['vault.service', { problem: 'Call failed: Access denied' }]]) },
      );
      expect(failed).toEqual({ warnings: [], problems: ['capabilities of vault.service not read from systemd: Call failed: Access denied'], notes: [] });
      const none = decideHeldCapabilities(members, FACTS, { tasks: [], problems: [] }, { available: false, why: 'no system bus' });
      expect(none).toEqual({
        warnings: [],
        problems: [],
        notes: ['capabilities of units not read from systemd: no system bus; their running processes were checked'],
      });
    });

    it("reads busctl's values; a 64-bit mask keeps its low bits", () => {
      expect(parseValue('t 18446744073709551615', 't')).toBe(18446744073709551615n);
      expect(parseValue('s "ro\\"ot"', 's')).toBe('ro"ot');
      expect(parseValue('o "/org/freedesktop/systemd1/unit/a_2eservice"', 'o')).toBe('/org/freedesktop/systemd1/unit/a_2eservice');
      expect(parseValue('b false', 'b')).toBe(false);
      expect(parseValue('s 12', 't')).toBeUndefined();
      expect(parseValue('t -1', 't')).toBeUndefined();
      expect(parseValue(undefined, 's')).toBeUndefined();
    });
  });

  it('nothing is read when no member is confined; units only for unit: services', () => {
    const asked: string[] = [];
    const probe: CapabilityProbe = {
      tasks: () => (asked.push('tasks'), { tasks: [], problems: [] }),
      units: (names) => (asked.push(`units ${names.join(',')}`), { available: false, why: 'x' }),
    };
    checkCapabilities(policyFrom('apps: {web: {identity: {user: alice}}}\n'), FACTS, probe);
    expect(asked).toEqual([]);
    checkCapabilities(policyFrom('systemDomains: {d: {members: [{user: vault}, {unit: s.scope}]}}\n'), FACTS, probe);
    expect(asked).toEqual(['tasks']);
    checkCapabilities(policy, FACTS, probe);
    expect(asked).toEqual(['tasks', 'tasks', 'units vault.service']);
  });
});

describe('egressctl check and status carry the warnings', () => {
  const probe: CapabilityProbe = {
    tasks: () => ({
      tasks: [task(4242, 'system.slice/vault.service', status({ name: 'vaultd', eff: RAW }))],
      problems: ['capabilities of PID 7 not checked: EACCES'],
    }),
    units: () => ({ available: false, why: 'no system bus (stand-in)' }),
  };
  const run = (...argv: string[]) => runEgressctl(argv, { capabilities: probe });

  it('check: a warning at the member line, exit 0; --json stays one document with them in it', async () => {
    const dir = policyDir({ 'a.yaml': 'systemDomains:\n  offline:\n    members:\n      - {unit: vault.service}\n' });
    const text = await run('check', dir);
    expect(text.code).toBe(0);
    expect(text.err).toContain(
      `${dir}/a.yaml:4:9: warning: system domain offline member unit vault.service is not confined by the table: PID 4242 ("vaultd") holds CAP_NET_RAW`,
    );
    expect(text.err).toContain('warning: capabilities of PID 7 not checked: EACCES');
    expect(text.err).toContain('capabilities of units not read from systemd: no system bus (stand-in); their running processes were checked');
    expect(text.err).toMatch(/valid — .*; 1 warnings$/m);
    const json = await run('check', dir, '--json');
    expect(json.code).toBe(0);
    const report = JSON.parse(json.out) as {
      ok: boolean;
      warnings: { line: number; message: string }[];
      capabilities: { problems: string[]; notes: string[] };
    };
    expect(report.ok).toBe(true);
    expect(report.warnings).toEqual([expect.objectContaining({ line: 4, message: expect.stringContaining('PID 4242 ("vaultd") holds CAP_NET_RAW') })]);
    expect(report.capabilities.problems).toEqual(['capabilities of PID 7 not checked: EACCES']);
    expect(report.capabilities.notes).toEqual([expect.stringContaining('no system bus (stand-in)')]);
  });
});
