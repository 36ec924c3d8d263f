import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { nftAvailable } from '../support/nft-check.js';
import { deleteNamedNetns } from '../../src/lab/sys.js';
import { policyDir } from '../support/policy-dir.js';

/**
 * Users and groups through a real NSS module: Debian's libnss-extrausers
 * reads /var/lib/extrausers/{passwd,group}. In a private mount namespace of
 * this test, a test nsswitch.conf ("passwd: files extrausers") and a test
 * extrausers directory are bind-mounted over the machine's, so a user that
 * exists only there — not in /etc/passwd — is known to egressctl running
 * inside, and to nothing outside. Enforcement goes into a network namespace
 * of the test's own.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const EXTRAUSERS = '/var/lib/extrausers';
const skip =
  nftAvailable() ??
  (spawnSync('unshare', ['--version']).status !== 0 ? 'needs unshare (util-linux)' : undefined) ??
  (['/usr/lib/libnss_extrausers.so.2', '/lib/x86_64-linux-gnu/libnss_extrausers.so.2', '/usr/lib/x86_64-linux-gnu/libnss_extrausers.so.2'].some(existsSync) &&
  existsSync(EXTRAUSERS)
    ? undefined
    : 'libnss-extrausers is not installed (scripts/setup.sh installs it)');

const id = randomBytes(3).toString('hex');
const ns = `egd-nss-${id}`;
const GHOST = `egd-ghost-${id}`;
const GHOST_UID = 61000 + (parseInt(id, 16) % 3000);
const GHOST_GROUP = `egd-ghostgrp-${id}`;
const GHOST_GID = GHOST_UID + 1;
const MISSING = `egd-missing-${id}`;
const work = mkdtempSync(join(tmpdir(), 'egd-nss-'));
const state = join(work, 'state');

/**
 * egressctl in a fresh mount namespace with the test's name service in
 * place, inside the test's network namespace. `nsswitch` picks the
 * nsswitch.conf: one that reads extrausers, or one whose module cannot load.
 */
function egressctl(args: string[], nsswitch: 'extrausers' | 'broken' = 'extrausers'): SpawnSyncReturns<string> {
  const script = [
    'set -e',
    'mount --make-rprivate /',
    `mount --bind ${join(work, `nsswitch-${nsswitch}.conf`)} /etc/nsswitch.conf`,
    `mount --bind ${join(work, 'extrausers')} ${EXTRAUSERS}`,
    `exec nsenter --net=/run/netns/${ns} "$@"`,
  ].join('\n');
  return spawnSync('unshare', ['--mount', 'sh', '-c', script, 'sh', process.execPath, '--import', 'tsx', join(ROOT, 'src/cli/main.ts'), ...args], {
    encoding: 'utf8',
    env: { ...process.env, EGRESSD_STATE_DIR: state },
    timeout: 60_000,
  });
}
const nft = (...args: string[]) => spawnSync('nsenter', [`--net=/run/netns/${ns}`, 'nft', ...args], { encoding: 'utf8' });
const ruleset = () => nft('-j', 'list', 'ruleset').stdout;

const domainPolicy = (member: string) => ({ '00.yaml': `defaults: {egress: allow}\nsystemDomains:\n  offline:\n    members:\n      - ${member}\n` });

describe.skipIf(skip)(`users and groups through NSS (libnss-extrausers) ${skip ? `(skipped: ${skip})` : ''}`, () => {
  beforeAll(() => {
    mkdirSync(join(work, 'extrausers'));
    writeFileSync(join(work, 'extrausers', 'passwd'), `${GHOST}:x:${GHOST_UID}:${GHOST_GID}::/nonexistent:/usr/sbin/nologin\n`);
    writeFileSync(join(work, 'extrausers', 'group'), `${GHOST_GROUP}:x:${GHOST_GID}:\n`);
    writeFileSync(join(work, 'nsswitch-extrausers.conf'), 'passwd: files extrausers\ngroup: files extrausers\n');
    // A module that cannot be loaded: glibc reports the lookup as unavailable, not as "no such user".
    writeFileSync(join(work, 'nsswitch-broken.conf'), 'passwd: egdnosuchmodule\ngroup: egdnosuchmodule\n');
    spawnSync('ip', ['netns', 'add', ns]);
  });
  afterAll(() => {
    deleteNamedNetns(ns);
    rmSync(work, { recursive: true, force: true });
  });

  it('the test user exists only through the NSS module: not in /etc/passwd, not outside the mount namespace', () => {
    expect(readFileSync('/etc/passwd', 'utf8')).not.toContain(GHOST);
    expect(spawnSync('getent', ['passwd', GHOST]).status).toBe(2);
  });

  it('a system domain member known only through NSS compiles into the uid map, and apply puts it in the kernel', () => {
    const dir = policyDir(domainPolicy(`{user: ${GHOST}}`));
    const check = egressctl(['check', dir]);
    expect(check.stderr).not.toContain('does not exist');
    expect(check.status).toBe(0);
    const compiled = egressctl(['compile', dir]);
    expect(compiled.status).toBe(0);
    expect(compiled.stdout).toMatch(new RegExp(`map sd_uid \\{[^}]*elements = \\{ ${GHOST_UID} : goto sd_offline \\}`));
    const applied = egressctl(['apply', dir]);
    expect(applied.stderr).toContain('applied');
    expect(applied.status).toBe(0);
    expect(nft('list', 'ruleset').stdout).toMatch(new RegExp(`elements = \\{ ${GHOST_UID} : goto sd_offline\\.[ab] \\}`));
  });

  it('a group known only through NSS does too', () => {
    const compiled = egressctl(['compile', policyDir(domainPolicy(`{group: ${GHOST_GROUP}}`))]);
    expect(compiled.status).toBe(0);
    expect(compiled.stdout).toMatch(new RegExp(`map sd_gid \\{[^}]*elements = \\{ ${GHOST_GID} : goto sd_offline \\}`));
  });

  it('a system domain member that does not exist: check and apply fail with file:line, and apply changes nothing', () => {
    egressctl(['apply', policyDir(domainPolicy(`{user: ${GHOST}}`))]);
    const before = ruleset();
    expect(before).toContain('sd_offline');
    const lastGood = readFileSync(join(state, 'last-good.nft'), 'utf8');
    const dir = policyDir(domainPolicy(`{user: ${MISSING}}`));
    const message = `00.yaml:5:9: user "${MISSING}" of system domain offline does not exist on this machine; it would match nothing and be let out`;
    const check = egressctl(['check', dir]);
    expect(check.status).toBe(2);
    expect(check.stderr).toContain(`${dir}/${message}`);
    const json = egressctl(['check', dir, '--json']);
    expect(JSON.parse(json.stdout)).toMatchObject({ ok: false, errors: [{ file: '00.yaml', line: 5, col: 9 }] });
    const compiled = egressctl(['compile', dir]);
    expect(compiled.status).toBe(2);
    expect(compiled.stdout).toBe('');
    const applied = egressctl(['apply', dir]);
    expect(applied.status).toBe(2);
    expect(applied.stderr).toContain(`${dir}/${message}`);
    expect(applied.stderr).toContain('nothing was changed');
    expect(ruleset()).toBe(before);
    expect(readFileSync(join(state, 'last-good.nft'), 'utf8')).toBe(lastGood);
  });

  it('a missing member marked optional, or a missing user of an app, is a warning that names it', () => {
    const optional = egressctl(['apply', policyDir(domainPolicy(`{user: ${MISSING}, optional: true}`))]);
    expect(optional.status).toBe(0);
    expect(optional.stderr).toContain(`00.yaml:5:9: warning: user "${MISSING}" of system domain offline does not exist on this machine`);
    const app = egressctl(['check', policyDir({ '00.yaml': `apps:\n  web:\n    identity: {user: ${MISSING}}\n` })]);
    expect(app.status).toBe(0);
    expect(app.stderr).toContain(`00.yaml:3:15: warning: user "${MISSING}" of app web does not exist on this machine`);
  });

  it("Tor's user that does not exist is an error while updates over Tor are on", () => {
    const check = egressctl(['check', policyDir({ '00.yaml': `tor: {enabled: true, user: ${MISSING}}\n` })]);
    expect(check.status).toBe(2);
    expect(check.stderr).toContain(`00.yaml:1:28: Tor's user "${MISSING}" does not exist on this machine`);
  });

  it('a name service that fails is an error, even for an app: a miss and a failure are not the same', () => {
    const check = egressctl(['check', policyDir({ '00.yaml': 'apps:\n  web:\n    identity: {user: root}\n' })], 'broken');
    expect(check.status).toBe(3);
    expect(check.stderr).toContain('00.yaml:3:15: cannot look up user "root": getpwnam_r: a name service module in nsswitch.conf is unavailable');
  });
});
