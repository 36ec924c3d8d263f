import type { ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import * as packet from 'dns-packet';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet, type TestUsers } from '../harness/index.js';

/**
 * who.ts in a test net's host namespace, with cgroup2 at /sys/fs/cgroup (the
 * harness's private mount namespace): a stand-in resolver
 * (fixtures/who-server.ts) answers each query with who identify() says
 * asked, and clients run as egd-app1 in a cgroup of their own — a UDP socket
 * that is connected (glibc's stub resolver, dig), one that is not (dnsperf,
 * a sendto() per query), TCP, over IPv4 and IPv6.
 */
const SERVER = join(import.meta.dirname, 'fixtures/who-server.ts');
const TSX = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;
const ADDR4 = '127.0.0.153';
const ADDR6 = '::1';
const PORT = 53;
const unavailable = harnessUnavailableReason();

/** A client as app1 runs it: one query for `name` of type TXT, the reply in base64, and its own cgroup v2 path. */
const CLIENT = `
const [mode, addr, port, name, from] = JSON.parse(process.argv[1]);
const labels = name.split('.').flatMap((l) => [Buffer.from([l.length]), Buffer.from(l)]);
const query = Buffer.concat([Buffer.from([0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]), ...labels, Buffer.from([0, 0, 16, 0, 1])]);
const cgroup = require('fs').readFileSync('/proc/self/cgroup', 'utf8').split('\\n').find((l) => l.startsWith('0::')).slice(3);
const done = (reply) => { console.log(JSON.stringify({ reply: reply.toString('base64'), cgroup })); process.exit(0); };
setTimeout(() => { console.error('no reply'); process.exit(1); }, 3000);
if (mode === 'tcp') {
  const s = require('net').connect(port, addr, () => { const l = Buffer.alloc(2); l.writeUInt16BE(query.length); s.write(Buffer.concat([l, query])); });
  let got = Buffer.alloc(0);
  s.on('data', (d) => { got = Buffer.concat([got, d]); if (got.length >= 2 && got.length >= 2 + got.readUInt16BE(0)) done(got.subarray(2)); });
} else {
  const s = require('dgram').createSocket(addr.includes(':') ? 'udp6' : 'udp4');
  s.on('message', done);
  if (mode === 'connected') s.connect(port, addr, () => s.send(query));
  else if (from) s.bind(from, () => s.send(query, port, addr));
  else s.send(query, port, addr);
}
`;

interface Said {
  who?: { uid: number; gid?: number; cgroup?: string };
  client?: { transport: string; address: string; port: number };
  error?: string;
  missing?: string;
  us?: number;
}

function said(reply: Buffer): Said {
  const decoded = packet.decode(reply);
  const txt = decoded.answers?.[0];
  if (!txt || txt.type !== 'TXT') throw new Error(`no TXT answer: ${JSON.stringify(decoded)}`);
  return JSON.parse((txt.data as Buffer[]).map((b) => b.toString()).join('')) as Said;
}

describe.skipIf(unavailable)(`who asks: the client socket through sock_diag ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let users: TestUsers;
  let cgroup: string;
  const servers: ChildProcess[] = [];

  const start = async (method: 'handle' | 'walk', port: number, without?: string): Promise<void> => {
    const argv = [process.execPath, '--import', TSX, SERVER, JSON.stringify({ addrs: [ADDR4, ADDR6], port, method })];
    // Root without a capability: gone from the bounding set, it is not regained at exec.
    const [cmd, ...args] = without ? ['setpriv', `--bounding-set=-${without}`, '--inh-caps=-all', '--', ...argv] : argv;
    const child = net.host.spawn(cmd!, args);
    servers.push(child);
    await new Promise<void>((resolve, reject) => {
      let out = '';
      let err = '';
      const timer = setTimeout(() => reject(new Error(`the stand-in resolver did not start: ${err}`)), 20_000);
      child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('"ready":true')) {
          clearTimeout(timer);
          resolve();
        }
      });
      child.on('exit', (code) => reject(new Error(`the stand-in resolver exited (${code}): ${err}`)));
    });
  };

  const ask = async (
    mode: 'connected' | 'unconnected' | 'tcp',
    addr: string,
    name = 'who.test',
    port = PORT,
    as: { user?: string; from?: number } = {},
  ): Promise<Said & { own: string }> => {
    const r = await net.host.exec(process.execPath, ['-e', CLIENT, JSON.stringify([mode, addr, port, name, as.from ?? 0])], {
      user: as.user ?? users.app1.name,
      cgroup,
    });
    if (r.code !== 0) throw new Error(`client failed (${r.code}): ${r.stderr}`);
    const out = JSON.parse(r.stdout) as { reply: string; cgroup: string };
    return { ...said(Buffer.from(out.reply, 'base64')), own: out.cgroup.replace(/^\//, '') };
  };

  beforeAll(async () => {
    users = ensureTestUsers();
    net = await createTestNet();
    cgroup = net.host.mkCgroup(`egd-who-${net.id}/app1.scope`);
    await start('handle', PORT);
  }, 60_000);
  afterAll(async () => {
    for (const child of servers) child.kill();
    await net?.destroy();
  });

  for (const [mode, what] of [
    ['connected', 'a connected UDP socket (glibc, dig)'],
    ['unconnected', 'a UDP socket that is not connected (dnsperf, sendto per query)'],
    ['tcp', 'TCP'],
  ] as const) {
    for (const addr of [ADDR4, ADDR6]) {
      it(`${what} over IPv${addr.includes(':') ? 6 : 4}: app1's uid and its cgroup, not the resolver's own socket (root)`, async () => {
        const answer = await ask(mode, addr);
        expect(answer.error).toBeUndefined();
        expect(answer.client?.transport).toBe(mode === 'tcp' ? 'tcp' : 'udp');
        expect(answer.who?.uid).toBe(users.app1.uid);
        expect(answer.own).toBe(cgroup);
        expect(answer.who?.cgroup).toBe(cgroup);
      });
    }
  }

  it('a dual-stack IPv6 socket sending to the IPv4 address (v4-mapped) is found too', async () => {
    for (const mode of ['connected', 'unconnected', 'tcp'] as const) {
      const answer = await ask(mode, `::ffff:${ADDR4}`);
      expect(answer.client?.address, mode).toBe('127.0.0.1');
      expect(answer.who, mode).toEqual({ uid: users.app1.uid, cgroup });
    }
  });

  it('a real client, dig, over UDP and TCP', async () => {
    for (const transport of ['+notcp', '+tcp']) {
      const r = await net.host.exec('dig', [transport, '+short', '+tries=1', '+time=2', `@${ADDR4}`, '-p', String(PORT), 'TXT', 'who.test'], {
        user: users.app1.name,
        cgroup,
      });
      expect(r.code, r.stderr).toBe(0);
      const text = [...r.stdout.matchAll(/"((?:[^"\\]|\\.)*)"/g)].map((m) => m[1]!.replace(/\\(.)/g, '$1')).join('');
      const answer = JSON.parse(text) as Said;
      expect(answer.who, transport).toEqual({ uid: users.app1.uid, cgroup });
    }
  });

  it("the resolver's batched lookup: a port another user takes over is that user's at once, never the first one's", async () => {
    // The attack on any memory of who asked: app1 asks from a port and closes it; app2 binds the same port and asks. Answered as app1, app2 would get app1's answers.
    const from = 40_000 + (process.pid % 20_000);
    for (const addr of [ADDR4, ADDR6]) {
      const first = await ask('unconnected', addr, 'batched.test', PORT, { from });
      expect(first.error).toBeUndefined();
      expect(first.client?.port).toBe(from);
      expect(first.who?.uid).toBe(users.app1.uid);
      const second = await ask('unconnected', addr, 'batched.test', PORT, { from, user: users.app2.name });
      expect(second.client?.port).toBe(from);
      expect(second.who?.uid).toBe(users.app2.uid);
      const third = await ask('unconnected', addr, 'batched.test', PORT, { from });
      expect(third.who?.uid).toBe(users.app1.uid);
    }
  });

  it('a socket that is not there is EGD_SOCKET_NOT_FOUND, not a guess', async () => {
    const answer = await ask('connected', ADDR4, 'missing.test');
    expect(answer.who?.uid).toBe(users.app1.uid);
    expect(answer.missing).toBe('EGD_SOCKET_NOT_FOUND');
  });

  it('a client outside every cgroup but the root has the root cgroup, ""', async () => {
    const r = await net.host.exec(process.execPath, ['-e', CLIENT, JSON.stringify(['connected', ADDR4, PORT, 'who.test'])], {
      user: users.app1.name,
      cgroup: '',
    });
    expect(r.code, r.stderr).toBe(0);
    const out = JSON.parse(r.stdout) as { reply: string; cgroup: string };
    expect(out.cgroup).toBe('/');
    expect(said(Buffer.from(out.reply, 'base64')).who).toEqual({ uid: users.app1.uid, cgroup: '' });
  });

  it('without CAP_DAC_READ_SEARCH (no open_by_handle_at) the path is found by a walk', async () => {
    await start('handle', 5354, 'dac_read_search');
    expect((await ask('tcp', ADDR6, 'who.test', 5354)).who).toEqual({ uid: users.app1.uid, cgroup });
  });

  it('the cgroup path found by a walk of cgroupfs is the same; identify costs microseconds (printed)', async () => {
    await start('walk', 5353);
    expect((await ask('unconnected', ADDR4, 'who.test', 5353)).who).toEqual({ uid: users.app1.uid, cgroup });
    for (const [name, port] of [
      ['handle', PORT],
      ['walk', 5353],
    ] as const) {
      for (const mode of ['connected', 'unconnected', 'tcp'] as const) {
        const answer = await ask(mode, ADDR4, 'cost.test', port);
        console.log(`identify (${mode}, cgroup path by ${name}, cached): ${answer.us!.toFixed(2)} µs per call`);
        expect(answer.us).toBeLessThan(1000);
      }
    }
  });
});
