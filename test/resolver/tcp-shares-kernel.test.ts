import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ownerKeys } from '../../src/resolver/owner.js';
import { startResolver, type Resolver } from '../../src/resolver/server.js';
import { openWhoAsks, type Who, type WhoAsks } from '../../src/resolver/who.js';
import { ensureTestUsers, type TestUsers } from '../harness/index.js';
import { printed, until } from '../support/wait.js';
import { startDnsmasq, type Dnsmasq } from './dns-support.js';

/**
 * The resolver's TCP connections shared out per user, as egressd runs it:
 * who holds a connection is found when it connects, through sock_diag on
 * its four addresses (who.ts), and counted as its owner (owner.ts, with a
 * subordinate-uid file of the test's own). Clients run as other uids
 * (setpriv) on loopback; a dnsmasq answers.
 */
const unavailable =
  process.getuid?.() !== 0 ? 'needs root (setpriv, sock_diag of other users)' : existsSync('/usr/sbin/dnsmasq') ? undefined : 'dnsmasq is not installed';

/** Subordinate uids of egd-app1 in the test's /etc/subuid. */
const SUBUIDS = 200_000;
const LIMITS = { maxTcpConnections: 12, maxTcpConnectionsPerAsker: 4, maxTcpConnectionsUnowned: 2, tcpIdleMs: 120_000 };

/**
 * Opens `count` connections to the resolver, all at once (`held`: each kept
 * open after its answer) or one after another (`serial`: each closed after
 * its answer), each asking one A query; prints how many were answered and
 * how many the resolver closed unanswered, then waits for its stdin to close.
 */
const CLIENT = `
const net = require('net');
const [port, count, mode] = JSON.parse(process.argv[1]);
const q = Buffer.from('00 0c 12 34 01 00 00 01 00 00 00 00 00 00 01 61 07 65 78 61 6d 70 6c 65 04 74 65 73 74 00 00 01 00 01'.replace(/ /g, ''), 'hex');
const tally = { answered: 0, closed: 0 };
const one = (settled) => {
  const s = net.connect(port, '127.0.0.1', () => s.write(q));
  let got = Buffer.alloc(0);
  let done = false;
  const end = (how) => { if (done) return; done = true; tally[how]++; if (mode === 'serial') s.destroy(); settled(); };
  s.on('data', (d) => { got = Buffer.concat([got, d]); if (got.length >= 2 && got.length >= 2 + got.readUInt16BE(0)) end('answered'); });
  s.on('error', () => undefined);
  s.on('close', () => end('closed'));
};
const report = () => console.log(JSON.stringify(tally));
if (mode === 'serial') { let left = count; const next = () => (left-- > 0 ? one(next) : report()); next(); }
else { let left = count; for (let i = 0; i < count; i++) one(() => { if (--left === 0) report(); }); }
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
`;

interface Tally {
  answered: number;
  closed: number;
}

describe.skipIf(unavailable)(`TCP connections per user ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let users: TestUsers;
  let upstream: Dnsmasq;
  let dir: string;
  let who: WhoAsks;
  let resolver: Resolver;
  let port: number;
  const clients: ChildProcess[] = [];

  /** A client run as `uid` (and gid `uid`); resolves with its tally once every connection is answered or closed, leaving it running. */
  const connect = async (uid: number, count: number, mode: 'held' | 'serial' = 'held'): Promise<{ tally: Tally; child: ChildProcess }> => {
    const child = spawn(
      'setpriv',
      [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups', '--', process.execPath, '-e', CLIENT, JSON.stringify([port, count, mode])],
      {
        stdio: ['pipe', 'pipe', 'pipe'],
      },
    );
    clients.push(child);
    const out = await printed(child, 'stdout', '}\n');
    return { tally: JSON.parse(out) as Tally, child };
  };
  const ended = async (child: ChildProcess): Promise<void> => {
    const exited = new Promise<void>((resolve) => (child.exitCode === null ? child.once('exit', () => resolve()) : resolve()));
    child.stdin!.end();
    await exited;
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    upstream = await startDnsmasq(['--host-record=a.example.test,192.0.2.10']);
    dir = mkdtempSync(join(tmpdir(), 'egd-tcp-shares-'));
    // The owner by uid, as newuidmap also reads it: by name, a lookup that failed under a loaded machine once split the share (owner.test.ts covers names).
    writeFileSync(join(dir, 'subuid'), `${users.app1.uid}:${SUBUIDS}:65536\n`);
    who = openWhoAsks();
    const ownerOf = ownerKeys({ subuidFile: join(dir, 'subuid') });
    resolver = await startResolver<Who>({
      listen: ['127.0.0.1'],
      port: 0,
      upstreams: [`127.0.0.1#${upstream.port}`],
      hooks: { identify: (client) => who.identifyInBatch(client), admit: () => 'go', learn: () => undefined, shape: () => 'answer' },
      askerKey: (asker) => ownerOf(asker.uid),
      limits: LIMITS,
    });
    port = resolver.addresses.find((a) => a.transport === 'tcp')!.port;
  }, 30_000);
  afterEach(async () => {
    await Promise.all(clients.splice(0).map(ended));
    await until('every connection closed', () => resolver.stats().tcpConnections === 0);
  });
  afterAll(async () => {
    await resolver?.close();
    who?.close();
    await upstream?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it("one user holds at most its share of the connections, and another user's TCP query is answered", async () => {
    const before = resolver.stats();
    // As many as the resolver takes in all: without a share per user, app1 holds every connection.
    const flood = await connect(users.app1.uid, LIMITS.maxTcpConnections);
    const other = await connect(users.app2.uid, 1);
    expect(other.tally).toEqual({ answered: 1, closed: 0 });
    expect(flood.tally).toEqual({ answered: LIMITS.maxTcpConnectionsPerAsker, closed: LIMITS.maxTcpConnections - LIMITS.maxTcpConnectionsPerAsker });
    const after = resolver.stats();
    expect(after.tcpRejectedByAsker - before.tcpRejectedByAsker).toBe(LIMITS.maxTcpConnections - LIMITS.maxTcpConnectionsPerAsker);
    expect(after.tcpRejected - before.tcpRejected).toBe(LIMITS.maxTcpConnections - LIMITS.maxTcpConnectionsPerAsker);
    // app1's answered connections are still open, held against its share.
    expect(after.tcpConnections).toBe(LIMITS.maxTcpConnectionsPerAsker + 1);
  });

  it("a user's subordinate uids share its connections", async () => {
    const held: Tally[] = [];
    // Each subordinate uid asks for a full share: one share between them (three shares would be every connection).
    for (let i = 0; i < 3; i++) held.push((await connect(SUBUIDS + i, LIMITS.maxTcpConnectionsPerAsker)).tally);
    expect((await connect(users.app2.uid, 1)).tally).toEqual({ answered: 1, closed: 0 });
    expect(held.reduce((sum, t) => sum + t.answered, 0)).toBe(LIMITS.maxTcpConnectionsPerAsker);
    expect((await connect(users.app1.uid, 1)).tally).toEqual({ answered: 0, closed: 1 });
  });

  it('a share comes back as its connections close: when their owner exits, and one short connection after another', async () => {
    const first = await connect(users.app1.uid, LIMITS.maxTcpConnectionsPerAsker + 1);
    expect(first.tally.answered).toBe(LIMITS.maxTcpConnectionsPerAsker);
    // The owner ends: the kernel closes its sockets, and the resolver gives back what they held.
    await ended(first.child);
    await until('the exited owner’s connections closed', () => resolver.stats().tcpConnections === 0);
    expect((await connect(users.app1.uid, LIMITS.maxTcpConnectionsPerAsker)).tally.answered).toBe(LIMITS.maxTcpConnectionsPerAsker);
    await Promise.all(clients.splice(0).map(ended));
    await until('those closed too', () => resolver.stats().tcpConnections === 0);
    // Many connections, each closed after its answer, never hold more than one at a time.
    expect((await connect(users.app1.uid, 5 * LIMITS.maxTcpConnectionsPerAsker, 'serial')).tally).toEqual({
      answered: 5 * LIMITS.maxTcpConnectionsPerAsker,
      closed: 0,
    });
  });
});
