import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { until } from '../support/wait.js';

/**
 * Data queued before close() must not leave after a deny (issue 17, finding
 * 1). A socket closed by its program while data is still queued becomes an
 * orphan: the kernel goes on sending, but the socket has no file any more,
 * so `meta skuid/skgid` match nothing and its packets fall to the default.
 * Apply cuts such connections through sock_diag; these tests watch the
 * internet side for anything written after the apply.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();
const MIB = 1024 * 1024;

/**
 * Internet side: accepts connections and counts the bytes it reads; answers
 * "ok" to a connection's first bytes. Paused ("paused" argument), it reads
 * nothing until told "resume", so a client's data waits in the kernels.
 */
const SERVER = String.raw`
const net = require('node:net');
const readline = require('node:readline');
const [addr, paused] = process.argv.slice(-2);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
let bytes = 0;
const socks = [];
const srv = net.createServer((sock) => {
  socks.push(sock);
  if (paused === 'paused') sock.pause();
  // Paused, it never answers: data sent to a closed socket makes the kernel reset it (TCPAbortOnData).
  let replied = paused === 'paused';
  sock.on('data', (d) => { bytes += d.length; if (!replied) { replied = true; sock.write('ok\n'); } });
  sock.on('error', (e) => out({ ev: 'error', code: e.code }));
});
srv.listen({ host: addr, port: 0 }, () => out({ ev: 'listening', port: srv.address().port }));
readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (line === 'resume') for (const s of socks) s.resume();
  if (line === 'count') out({ ev: 'count', bytes });
});
process.stdin.on('close', () => process.exit(0));
`;

/**
 * Host side: opens a connection and says "before"; then on "go" writes
 * 1 MiB and closes the socket half a second later, leaving the kernel with
 * what it queued. With "now", it writes and closes at once, unasked.
 */
const CLIENT = String.raw`
const net = require('node:net');
const readline = require('node:readline');
const [addr, port, mode] = process.argv.slice(-3);
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const s = net.connect({ host: addr, port: Number(port) });
const writeAndClose = () => {
  s.write(Buffer.alloc(${MIB}, 'x'));
  setTimeout(() => { out({ ev: 'closing', unsent: s.writableLength }); s.destroy(); process.exit(0); }, 500);
};
s.on('error', (e) => out({ ev: 'error', code: e.code }));
s.on('connect', () => {
  out({ ev: 'connected' });
  if (mode === 'now') writeAndClose();
  else s.write('before\n');
});
s.once('data', () => out({ ev: 'answered' }));
readline.createInterface({ input: process.stdin }).on('line', (line) => { if (line === 'go') writeAndClose(); });
`;

/** The events a child prints, one JSON object per line, as they come. */
function events(child: ChildProcess): { ev: string; [key: string]: unknown }[] {
  const seen: { ev: string }[] = [];
  let buffer = '';
  child.stdout!.on('data', (d: Buffer) => {
    buffer += d.toString();
    let at;
    while ((at = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, at);
      buffer = buffer.slice(at + 1);
      try {
        seen.push(JSON.parse(line) as { ev: string });
      } catch {
        /* not ours */
      }
    }
  });
  return seen;
}

const has = (seen: { ev: string }[], ev: string) => () => seen.some((e) => e.ev === ev);

describe.skipIf(unavailable)(
  `connections of denied identities are cut at apply, closed ones included ${unavailable ? `(skipped: ${unavailable})` : ''}`,
  () => {
    let net: TestNet;
    let users: TestUsers;
    let state: string;
    const children: ChildProcess[] = [];

    const apply = async (dir: string) => {
      const result = await net.host.node(CLI, ['apply', dir, '--json'], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
      if (result.code !== 0) throw new Error(`apply failed (${result.code}): ${result.stderr}`);
      return JSON.parse(result.stdout) as { sweep: { cut: { socket: string; ruleId: string }[]; failed: unknown[] } };
    };
    const server = async (paused: boolean) => {
      const child = net.inet.spawn(process.execPath, ['-e', SERVER, '192.0.2.2', paused ? 'paused' : 'reading']);
      children.push(child);
      const seen = events(child);
      await until('the server listens', has(seen, 'listening'));
      const port = Number(seen.find((e) => e.ev === 'listening')!['port']);
      const bytes = async () => {
        const before = seen.filter((e) => e.ev === 'count').length;
        child.stdin!.write('count\n');
        await until('the server counts', () => seen.filter((e) => e.ev === 'count').length > before);
        return Number(seen.filter((e) => e.ev === 'count').at(-1)!['bytes']);
      };
      return { port, bytes, resume: () => child.stdin!.write('resume\n') };
    };
    const client = (port: number, who: { user: string; group?: string }, mode: 'wait' | 'now' = 'wait') => {
      const child = net.host.spawn(process.execPath, ['-e', CLIENT, '192.0.2.2', String(port), mode], who);
      children.push(child);
      return { child, seen: events(child), go: () => child.stdin!.write('go\n') };
    };
    /** Orphans in this namespace: TCP sockets no program holds (ss shows no inode for them… as 0). */
    const orphansTo = async (port: number) => {
      const listing = await net.host.run('ss', ['-tnHe', 'state', 'fin-wait-1', 'dport', `= :${port}`]);
      return listing
        .split('\n')
        .filter((line) => / ino:0 /.test(line))
        .map((line) => ({ sendQ: Number(line.trim().split(/\s+/)[1]) }));
    };

    /**
     * Counts, on the internet side, TCP segments to `port` that carry data
     * (longer than any bare header; resets left out), from now on. A table of
     * the test's own in the test's namespace, beside the harness's.
     */
    const dataCounter = async (port: number) => {
      const table = `orphans${port}`;
      await net.inet.nft({
        stdin: `table inet ${table} {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport ${port} tcp flags & rst == 0 meta length > 100 counter\n  }\n}\n`,
      });
      return async () => {
        const listing = JSON.parse((await net.inet.nft(['-j', 'list', 'table', 'inet', table])).stdout) as {
          nftables: { rule?: { expr: { counter?: { packets: number } }[] } }[];
        };
        const packets = listing.nftables.flatMap((x) => x.rule?.expr ?? []).find((e) => e.counter)?.counter?.packets;
        if (packets === undefined) throw new Error(`no counter in table inet ${table}`);
        return packets;
      };
    };

    beforeAll(async () => {
      users = ensureTestUsers();
      net = await createTestNet();
      state = mkdtempSync(join(tmpdir(), 'egd-orphans-state-'));
    });
    afterAll(async () => {
      for (const child of children) child.kill('SIGKILL');
      await net?.destroy();
      if (state) rmSync(state, { recursive: true, force: true });
    });

    const allowAll = () => policyDir({ '00.yaml': 'defaults: {egress: allow}\n' });
    const cases = [
      {
        name: 'an app (by user) with a deny rule',
        who: () => ({ user: users.app1.name }),
        deny: (port: number) =>
          `defaults: {egress: allow}\napps:\n  app1: {identity: {user: ${users.app1.name}}, rules: [{deny: [192.0.2.2], ports: [${port}], proto: tcp}]}\n`,
        ruleId: 'app/app1/0',
      },
      {
        name: 'a system-domain member by user',
        who: () => ({ user: users.app2.name }),
        deny: () => `defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{user: ${users.app2.name}}]}\n`,
        ruleId: 'sd/offline',
      },
      {
        // A member by nothing but its socket's group (setpriv --regid): what `meta skgid` matches today.
        name: 'a system-domain member by group (the socket group only)',
        who: () => ({ user: users.app1.name, group: users.grp.name }),
        deny: () => `defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{group: ${users.grp.name}}]}\n`,
        ruleId: 'sd/offline',
      },
    ];

    for (const c of cases) {
      it(`${c.name}: data written after the deny and then left to a closed socket never arrives`, async () => {
        await apply(allowAll());
        const srv = await server(false);
        const { seen, go } = client(srv.port, c.who());
        await until('the connection works before the deny', has(seen, 'answered'), { timeoutMs: 5000 });
        expect(await srv.bytes()).toBe('before\n'.length);

        const applied = await apply(policyDir({ '00.yaml': c.deny(srv.port) }));
        expect(applied.sweep.failed).toEqual([]);
        expect(applied.sweep.cut).toEqual([
          { socket: expect.stringMatching(new RegExp(`-> 192\\.0\\.2\\.2:${srv.port} ESTABLISHED$`)) as unknown, ruleId: c.ruleId },
        ]);

        go();
        await until('the client wrote and closed', has(seen, 'closing'), { timeoutMs: 5000 });
        // A kernel that sends from the orphan does so at its next retransmission (≈ 0.2–0.4 s here).
        await new Promise((resolve) => setTimeout(resolve, 3000));
        expect(await srv.bytes()).toBe('before\n'.length);
      });
    }

    for (const c of [
      {
        name: 'an app (by user) with a deny rule',
        who: () => ({ user: users.app1.name }),
        deny: (port: number) =>
          `defaults: {egress: allow}\napps:\n  app1: {identity: {user: ${users.app1.name}}, rules: [{deny: [192.0.2.2], ports: [${port}], proto: tcp}]}\n`,
      },
      {
        // egd-app3's primary group is egd-grp: its orphan's group is gone, but its user is a member.
        name: 'a system-domain member by primary group',
        who: () => ({ user: users.app3.name }),
        deny: () => `defaults: {egress: allow}\nsystemDomains:\n  offline: {members: [{group: ${users.grp.name}}]}\n`,
      },
    ]) {
      it(`${c.name}: a socket closed before the deny, still holding data, sends none of it after`, async () => {
        await apply(allowAll());
        // A small receive buffer on the internet side (taken when the server's socket is made), so that most of the data waits on the host, in the orphan.
        const rmem = (await net.inet.run('sysctl', ['-n', 'net.ipv4.tcp_rmem'])).trim();
        await net.inet.run('sysctl', ['-w', 'net.ipv4.tcp_rmem=4096 8192 8192']);
        const srv = await server(true); // reads nothing: the client's data waits in the kernels
        const { seen } = client(srv.port, c.who(), 'now');
        await until('the client wrote and closed', has(seen, 'closing'), { timeoutMs: 5000 }).finally(() =>
          net.inet.run('sysctl', ['-w', `net.ipv4.tcp_rmem=${rmem}`]),
        );
        await until('an orphan holds queued data', async () => (await orphansTo(srv.port)).some((o) => o.sendQ > 0), { timeoutMs: 5000 });
        const applied = await apply(policyDir({ '00.yaml': c.deny(srv.port) }));
        expect(applied.sweep.failed).toEqual([]);
        expect(applied.sweep.cut.map((x) => x.socket)).toEqual([expect.stringMatching(/FIN_WAIT1 \(orphan\)$/)]);
        expect(await orphansTo(srv.port)).toEqual([]);
        // From now on, every data segment that reaches the internet side is counted (the reset the cut sent is not).
        const count = await dataCounter(srv.port);

        srv.resume(); // the window opens: an orphan left alone would send the rest now
        await new Promise((resolve) => setTimeout(resolve, 3000));
        expect(await srv.bytes()).toBeGreaterThan(0); // what had arrived before the apply
        expect(await count()).toBe(0);
      });
    }
  },
);
