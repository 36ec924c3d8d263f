import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TryResult } from '../../src/lab/try.js';
import { harnessNamespaces, harnessUnavailableReason } from '../harness/index.js';

const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'dist', 'cli', 'main.js');

/**
 * What `egressctl try` promises to leave as it found it, read on the
 * machine itself: the ruleset, the network namespaces (but the egd* ones
 * other test files make) and links, the
 * cgroup2 hierarchy (mounted privately to be read, as the lab mounts it),
 * users and groups, egressd's run-time files. Other test files build and
 * remove their own namespaces meanwhile, so those (and their lock files)
 * are left out, and so are the run-time directories they share (/run/egressd,
 * /run/egressd-test): the run's own files in them are checked by name.
 */
function hostState(): Record<string, string> {
  const run = (argv: string[]): string => {
    const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' });
    return `${r.status} ${r.stdout}${r.stderr}`;
  };
  const harness = new Set(harnessNamespaces());
  // Other test files add and remove accounts of their own meanwhile (all named egd-…, e.g. accounts-kernel's newcomer); try makes none of that name.
  const hash = (file: string): string =>
    createHash('sha256')
      .update(
        fs
          .readFileSync(file, 'utf8')
          .split('\n')
          .filter((line) => !line.startsWith('egd-'))
          .join('\n'),
      )
      .digest('hex');
  const cgroupDir = fs.mkdtempSync(join(os.tmpdir(), 'try-cg-'));
  // Other test files make and remove cgroups of their own meanwhile; try's are under /try.
  const cgroups = run(['unshare', '--mount', 'sh', '-c', `mount -t cgroup2 none ${cgroupDir} && cd ${cgroupDir} && (find try 2>/dev/null || echo 'no /try')`]);
  fs.rmdirSync(cgroupDir);
  return {
    ruleset: run(['nft', 'list', 'ruleset']),
    netns: (fs.existsSync('/run/netns') ? fs.readdirSync('/run/netns') : []).filter((n) => !harness.has(n) && !n.startsWith('egd')).join(','),
    links: run(['ip', '-o', 'link', 'show']).replace(/\s+\d+ packets.*$/gm, ''),
    addresses: run(['ip', '-o', 'address', 'show']),
    cgroups,
    passwd: hash('/etc/passwd'),
    group: hash('/etc/group'),
    daemons: run(['pgrep', '-f', 'dist/daemon/main.js --policy /tmp/egressctl-try-']),
  };
}

const unavailable = harnessUnavailableReason();

describe.skipIf(unavailable)('egressctl try', () => {
  let before: Record<string, string>;
  beforeAll(() => {
    before = hostState();
  });
  afterAll(() => {
    for (const dir of fs.readdirSync(os.tmpdir()).filter((d) => d.startsWith('egressctl-try-')))
      fs.rmSync(join(os.tmpdir(), dir), { recursive: true, force: true });
  });

  it('shows a telemetry name blocked, a mirror allowed and a system domain cut off, each with its rule, and leaves the host as it was', async () => {
    const ran = spawnSync(process.execPath, [CLI, 'try', '--json', '--no-color'], { encoding: 'utf8', timeout: 120_000 });
    const finished = Date.now();
    expect(ran.status, ran.stderr).toBe(0);
    const result = JSON.parse(ran.stdout) as TryResult;
    const [telemetry, mirror, offline] = result.samples;
    expect(telemetry).toMatchObject({ name: 'metrics.ubuntu.com', outcome: { lookup: { error: 'ENOTFOUND' } }, serverSaw: 0, blocked: true });
    expect(telemetry?.rule).toMatchObject({
      verdict: 'deny',
      at: expect.stringMatching(/^10-phone-home\.yaml:\d+$/),
      shortId: expect.stringMatching(/^r[0-9a-f]{8}$/),
    });
    expect(mirror).toMatchObject({ outcome: { lookup: { addresses: ['198.51.100.80'] }, connect: 'connected' }, serverSaw: 1, blocked: false });
    expect(mirror?.rule).toMatchObject({ verdict: 'allow', ruleId: 'default' });
    // The system domain's lookup is refused (by the resolver, or dropped in the kernel once the tracker wrote the new cgroup's
    // id), and its connection by address is dropped in the kernel: the server never saw it.
    expect(offline).toMatchObject({ outcome: { address: '198.51.100.80', connect: 'ETIMEDOUT' }, serverSaw: 0, blocked: true });
    expect(offline?.outcome.lookup).toEqual({ error: expect.stringMatching(/^(EREFUSED|ECONNREFUSED)$/) });
    expect(offline?.rule).toMatchObject({ verdict: 'deny', ruleId: 'sd/try-offline', at: '90-try.yaml:3' });
    // The kernel's drop, as egressd's denial reader recorded it in the lab's store: the rule that dropped it, who sent it, where to.
    expect(offline?.recorded).toMatchObject({
      ruleId: 'sd/try-offline',
      file: '90-try.yaml',
      line: 3,
      uid: 0,
      protocol: 'tcp',
      address: '198.51.100.80',
      port: 443,
    });
    expect(telemetry?.recorded).toBeUndefined();
    expect(ran.stderr).toMatch(/BLOCKED.*NXDOMAIN[\s\S]*ALLOWED[\s\S]*BLOCKED.*REFUSED/);
    expect(harnessNamespaces()).not.toContain(result.lab.host);
    expect(harnessNamespaces()).not.toContain(result.lab.internet);
    expect(hostState()).toEqual(before);
    // Its egressd's enforcement lock and resolver socket, named for the lab's namespace, are gone with it. The kernel gives a new
    // namespace the lowest free inode number, so the next one made after the lab's was gone has the lab's, and a test running
    // beside this one may have applied a table in it (full CI runs found such a lock twice). A lock names what its holder applied,
    // and the lab's egressd applied the lab's copy of the policies; any other file counts if it was made before `try` ended.
    const labs = (file: string): boolean => {
      if (file.endsWith('.lock')) return (fs.existsSync(file) ? fs.readFileSync(file, 'utf8') : '').includes('/egressctl-try-');
      return (fs.statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? Infinity) < finished;
    };
    const left = (dir: string, prefix: string): string[] =>
      fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.startsWith(prefix) && labs(`${dir}/${f}`)) : [];
    expect(left('/run/egressd', `net-${result.lab.hostNetnsInode}.`)).toEqual([]);
    expect(left('/run/egressd-test', result.lab.id.replace(/^egdt/, ''))).toEqual([]);
  }, 150_000);

  it('removes everything when interrupted with Ctrl-C half-way', async () => {
    const child = spawn(process.execPath, [CLI, 'try', '--no-color'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    const lab = await new Promise<string>((resolve, reject) => {
      child.stderr.on('data', (chunk: Buffer) => {
        stderr += chunk.toString();
        const match = /Built a throwaway network: (egdt[0-9a-f]{6})-host/.exec(stderr);
        if (match) resolve(match[1]!);
      });
      child.once('exit', () => reject(new Error(`try exited before building its network: ${stderr}`)));
    });
    // Interrupted while egressd starts in the lab: its processes, cgroups and namespaces exist by now.
    expect(harnessNamespaces()).toContain(`${lab}-host`);
    child.kill('SIGINT');
    const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
    expect(code, stderr).toBe(130);
    expect(stderr).toMatch(/Interrupted: removing everything/);
    expect(harnessNamespaces().filter((n) => n.startsWith(lab))).toEqual([]);
    expect(hostState()).toEqual(before);
  }, 150_000);

  it('says what is wrong with bad flags', () => {
    const ran = spawnSync(process.execPath, [CLI, 'try', '--colour'], { encoding: 'utf8' });
    expect(ran.status).toBe(2);
    expect(ran.stderr).toMatch(/--colour/);
  });
});
