import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, linkSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { formatIssue } from '../../src/policy/issues.js';
import { loadPolicyDir } from '../../src/policy/load.js';
import { ensureTestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';

const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const asRoot = process.getuid?.() === 0;

const scratch: string[] = [];
afterEach(() => {
  for (const dir of scratch.splice(0)) rmSync(dir, { recursive: true, force: true });
});
/** A directory outside the policy directory, e.g. one anyone may write. */
function outside(mode: number): string {
  const dir = mkdtempSync(join(tmpdir(), 'egd-outside-'));
  scratch.push(dir);
  chmodSync(dir, mode);
  return dir;
}

function errorsOf(dir: string, owners?: readonly number[]): string[] {
  const result = loadPolicyDir(dir, new Map(), owners);
  if (result.ok) throw new Error('expected the policy to be rejected');
  return result.errors.map((issue) => formatIssue(issue));
}

const LIST_POLICY = 'lists:\n  ads: {file: lists/ads.txt}\ndeny:\n  - to: ["@ads"]\n';

/**
 * egressd runs the policy as root: a file, directory or list another user
 * may write is that user's policy. Each case names the file and what is
 * wrong, as other policy errors do; the policy is not loaded.
 */
describe.skipIf(!asRoot)(`policy files only root may write ${asRoot ? '' : '(skipped: needs root to own and chown files)'}`, () => {
  it('a policy file writable by others', () => {
    const dir = policyDir({ '10-a.yaml': 'defaults: {egress: allow}\n' });
    chmodSync(join(dir, '10-a.yaml'), 0o666);
    expect(errorsOf(dir)).toEqual(['10-a.yaml:1:1: writable by others (mode 0666)']);
  });

  it('a policy file owned by another user (uid 65534)', () => {
    const dir = policyDir({ '10-a.yaml': 'defaults: {egress: allow}\n' });
    chownSync(join(dir, '10-a.yaml'), 65534, 65534);
    expect(errorsOf(dir)).toEqual(["10-a.yaml:1:1: owned by uid 65534; must be root's"]);
  });

  it('a group-writable policy directory', () => {
    const dir = policyDir({ '10-a.yaml': 'defaults: {egress: allow}\n' });
    chmodSync(dir, 0o770);
    expect(errorsOf(dir)).toEqual([`${dir}:1:1: writable by group 0 (mode 0770)`]);
  });

  it('a list file reached through a symlink into a world-writable directory: its owner and mode are right, its directory is not', () => {
    const open = outside(0o777);
    writeFileSync(join(open, 'ads.txt'), 'ads.example.com\n', { mode: 0o644 });
    const dir = policyDir({ '10-a.yaml': LIST_POLICY, 'lists/ads.txt': { symlink: join(open, 'ads.txt') } });
    expect(errorsOf(dir)).toEqual([`10-a.yaml:2:15: list "ads": cannot read lists/ads.txt: on its path, ${open} is writable by others (mode 0777)`]);
  });

  it('a policy file symlinked to, or a list hard-linked from, a directory another user owns: that user could put anything there', () => {
    const theirs = outside(0o755);
    chownSync(theirs, 65534, 65534);
    writeFileSync(join(theirs, '10-a.yaml'), 'defaults: {egress: allow}\n', { mode: 0o644 });
    const linked = policyDir({ '10-a.yaml': { symlink: join(theirs, '10-a.yaml') } });
    expect(errorsOf(linked)).toEqual([`10-a.yaml:1:1: on its path, ${theirs} is owned by uid 65534; must be root's`]);

    // A root-owned file's second name in that directory: judged by the name it was opened by.
    const dir = policyDir({ '10-a.yaml': `lists:\n  ads: {file: ${join(theirs, 'ads.txt')}}\ndeny:\n  - to: ["@ads"]\n`, 'ads.txt': 'ads.example.com\n' });
    linkSync(join(dir, 'ads.txt'), join(theirs, 'ads.txt'));
    expect(errorsOf(dir)).toEqual([
      `10-a.yaml:2:15: list "ads": cannot read ${join(theirs, 'ads.txt')}: on its path, ${theirs} is owned by uid 65534; must be root's`,
    ]);
  });

  it('what is fine: root-owned files 0644 under /tmp (sticky) and the shipped policies; a user may check a policy it owns, root may not load it', () => {
    const dir = policyDir({ '10-a.yaml': LIST_POLICY, 'lists/ads.txt': 'ads.example.com\n' });
    expect(loadPolicyDir(dir).ok).toBe(true);
    expect(loadPolicyDir(join(ROOT, 'policies')).ok).toBe(true);

    const users = ensureTestUsers();
    const own = mkdtempSync(join(tmpdir(), 'egd-users-policy-'));
    scratch.push(own);
    writeFileSync(join(own, '10-a.yaml'), 'defaults: {egress: allow}\n');
    for (const path of [own, join(own, '10-a.yaml')]) chownSync(path, users.app1.uid, users.app1.gid);
    const check = spawnSync(
      'setpriv',
      [`--reuid=${users.app1.uid}`, `--regid=${users.app1.gid}`, '--clear-groups', '--', process.execPath, '--import', 'tsx', CLI, 'check', own],
      { cwd: ROOT, encoding: 'utf8', env: { PATH: process.env['PATH'] ?? '', HOME: '/nonexistent' } },
    );
    expect(check.status, check.stderr).toBe(0);
    expect(errorsOf(own)).toEqual([`${own}:1:1: owned by uid ${users.app1.uid}; must be root's`]);
  }, 60_000);
});
