import { spawnSync, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type Server, type TestNet, type TestUsers } from '../harness/index.js';
import { nftAvailable } from '../support/nft-check.js';

/**
 * egressd follows the account files: a system domain's member user created
 * while it runs loses its network without anyone re-applying, and an edit
 * that changes nothing the policy uses re-applies nothing.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const skip = harnessUnavailableReason() ?? nftAvailable();
// This test's own user, made and removed here; egd- like every test user.
const NEWCOMER = `egd-w${randomBytes(3).toString('hex')}`;
const dir = mkdtempSync(join(tmpdir(), 'egd-accounts-policy-'));
const state = mkdtempSync(join(tmpdir(), 'egd-accounts-state-'));

interface LogLine {
  event: string;
  why?: string;
  files?: string[];
  digest?: string;
}

const getent = (name: string) => spawnSync('getent', ['passwd', name], { encoding: 'utf8' }).status === 0;

describe.skipIf(skip)(`the daemon re-applies when accounts change ${skip ? `(skipped: ${skip})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let daemon: ChildProcess;
  let server: Server;
  const lines: LogLine[] = [];
  const waiters: { match: (line: LogLine) => boolean; resolve: (line: LogLine) => void }[] = [];
  /** The first line from now on that matches; bounded, never a fixed sleep. */
  const next = (what: string, match: (line: LogLine) => boolean, timeoutMs = 15_000) =>
    new Promise<LogLine>((resolve, reject) => {
      waiters.push({ match, resolve });
      setTimeout(() => reject(new Error(`no ${what} log line; saw ${JSON.stringify(lines.map((l) => [l.event, l.why ?? l.files]))}`)), timeoutMs);
    });

  beforeAll(async () => {
    users = ensureTestUsers();
    expect(getent(NEWCOMER)).toBe(false);
    net = await createTestNet();
    server = await net.inet.listen({ proto: 'tcp', addr: net.addrs.inet.extra4[0]!, port: 0 });
    writeFileSync(
      join(dir, '00.yaml'),
      [
        'identities:',
        `  newcomer: {user: ${NEWCOMER}, optional: true}`,
        'systemDomains:',
        '  offline:',
        '    members: [newcomer]',
        // An upstream nobody answers: nothing here asks a name.
        'dns: {upstreams: ["192.0.2.53"]}',
        '',
      ].join('\n'),
    );
    daemon = net.host.spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'src/daemon/main.ts'), '--policy', dir, '--state', state], { cwd: ROOT });
    createInterface({ input: daemon.stdout! }).on('line', (text) => {
      let line: LogLine;
      try {
        line = JSON.parse(text) as LogLine;
      } catch {
        return;
      }
      lines.push(line);
      for (const waiter of waiters.filter((w) => w.match(line))) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(line);
      }
    });
    await next('first "applied"', (l) => l.event === 'applied' && l.why === 'start', 30_000);
  }, 60_000);

  afterAll(async () => {
    daemon?.kill('SIGKILL');
    // Only what this test made: its user (and the group useradd made for it), its net, its folders.
    if (getent(NEWCOMER)) spawnSync('userdel', [NEWCOMER]);
    if (spawnSync('getent', ['group', NEWCOMER]).status === 0) spawnSync('groupdel', [NEWCOMER]);
    await net?.destroy();
    rmSync(dir, { recursive: true, force: true });
    rmSync(state, { recursive: true, force: true });
    expect(getent(NEWCOMER)).toBe(false);
  });

  it('an edit of /etc/passwd that changes nothing the policy uses is looked at and re-applies nothing', async () => {
    const applies = lines.filter((l) => l.event === 'applied').length;
    const looked = next('"accounts-unchanged"', (l) => l.event === 'accounts-unchanged' && (l.files ?? []).includes('/etc/passwd'));
    const now = new Date();
    utimesSync('/etc/passwd', now, now);
    await looked;
    expect(lines.filter((l) => l.event === 'applied')).toHaveLength(applies);
    expect(lines.some((l) => l.event === 'accounts-changed')).toBe(false);
  });

  it('a member user created while it runs is cut off within a bounded wait, and the internet never sees it', async () => {
    // The server is there and reachable for a user outside the domain.
    const control = await net.host.connect({ proto: 'tcp', addr: server.addr, port: server.port, user: users.app1.uid });
    expect(control.ok).toBe(true);
    await server.reset();

    const reapplied = next('"applied" for "accounts changed"', (l) => l.event === 'applied' && l.why === 'accounts changed');
    const useradd = spawnSync(
      'useradd',
      ['--system', '--no-create-home', '--home-dir', '/nonexistent', '--shell', '/usr/sbin/nologin', '--user-group', NEWCOMER],
      {
        encoding: 'utf8',
      },
    );
    expect(useradd.stderr).toBe('');
    expect(useradd.status).toBe(0);
    const changed = lines.find((l) => l.event === 'accounts-changed') ?? (await next('"accounts-changed"', (l) => l.event === 'accounts-changed'));
    expect(changed.files).toContain('/etc/passwd');
    await reapplied;

    const tcp = await net.host.connect({ proto: 'tcp', addr: server.addr, port: server.port, user: NEWCOMER, timeoutMs: 1500 });
    expect(tcp.ok).toBe(false);
    expect(tcp.connected).toBe(false);
    expect(await server.seen()).toEqual([]);
    // Still open for everyone else.
    expect((await net.host.connect({ proto: 'tcp', addr: server.addr, port: server.port, user: users.app1.uid })).ok).toBe(true);
  });
});
