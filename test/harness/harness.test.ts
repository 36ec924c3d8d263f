// Tests of the kernel test harness itself: real namespaces, real packets, real nftables.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { until } from '../support/wait.js';
import { type TestNet, type TestUsers, cleanupStale, createTestNet, ensureTestUsers, harnessNamespaces, RUN_DIR } from './index.js';

let net: TestNet;
let users: TestUsers;
const timings: Record<string, number> = {};

beforeAll(async () => {
  users = ensureTestUsers();
  const t0 = Date.now();
  net = await createTestNet();
  timings['create'] = Date.now() - t0;
});

afterAll(async () => {
  const t0 = Date.now();
  await net?.destroy();
  timings['destroy'] = Date.now() - t0;
  console.log(`harness timings (ms): ${JSON.stringify(timings)}`);
});

describe('topology', () => {
  it('names the namespaces uniquely, within 15 characters', () => {
    const names = harnessNamespaces();
    expect(names).toContain(`egdt${net.id}-host`);
    expect(names).toContain(`egdt${net.id}-inet`);
    expect(net.host.netns.length).toBeLessThanOrEqual(15);
    expect(fs.existsSync(`${RUN_DIR}/${net.id}.json`)).toBe(true);
  });

  it('has the documented addresses and routes, and no default route', async () => {
    const addrs = await net.host.run('ip', ['-o', 'addr']);
    expect(addrs).toContain('192.0.2.1/24');
    expect(addrs).toContain('2001:db8::1/64');
    const routes = (await net.host.run('ip', ['route'])) + (await net.host.run('ip', ['-6', 'route']));
    expect(routes).not.toMatch(/^default/m);
    const inetRoutes = (await net.inet.run('ip', ['route'])) + (await net.inet.run('ip', ['-6', 'route']));
    expect(inetRoutes).not.toMatch(/^default/m);
    // the host's nftables ruleset starts empty: it is egressd's to fill
    expect((await net.host.nft(['list', 'ruleset'])).stdout.trim()).toBe('');
  });
});

describe('traffic', () => {
  const cases = [
    { proto: 'tcp', fam: 'v4' },
    { proto: 'tcp', fam: 'v6' },
    { proto: 'udp', fam: 'v4' },
    { proto: 'udp', fam: 'v6' },
  ] as const;
  for (const c of cases) {
    it(`${c.proto} over ${c.fam} reaches the internet side, which records it`, async () => {
      const addr = net.addrs.inet[c.fam];
      const srv = await net.inet.listen({ proto: c.proto, addr, port: 7000 });
      try {
        const r = await net.host.connect({ proto: c.proto, addr, port: 7000 });
        expect(r).toMatchObject({ ok: true, reply: 'ok' });
        const seen = await srv.seen();
        expect(seen).toHaveLength(1);
        expect(seen[0]).toMatchObject({ proto: c.proto, peer: net.addrs.host[c.fam], localPort: 7000, bytes: 3 });
      } finally {
        await srv.close();
      }
    });
  }

  it('reaches the extra addresses through the host routes (dual-stack listener)', async () => {
    const srv = await net.inet.listen({ proto: 'tcp', addr: '::', port: 0 });
    try {
      const targets = [net.addrs.inet.extra4[0]!, net.addrs.inet.extra4[3]!, net.addrs.inet.extra6[0]!];
      for (const addr of targets) {
        expect((await net.host.connect({ proto: 'tcp', addr, port: srv.port })).ok).toBe(true);
      }
      const seen = await srv.waitFor(3);
      expect(seen.map((s) => s.local)).toEqual(targets);
    } finally {
      await srv.close();
    }
  });

  it('fails fast for an address nobody holds, and for a closed port', async () => {
    for (const addr of [net.addrs.unused.v4, net.addrs.unused.v6]) {
      for (const proto of ['tcp', 'udp'] as const) {
        const r = await net.host.connect({ proto, addr, port: 7001, timeoutMs: 3000 });
        expect(r.ok).toBe(false);
        // Refused, not timed out: only the refusal gives ECONNREFUSED; a wait for the 3 s timeout would be ETIMEDOUT.
        expect(r.error).toBe('ECONNREFUSED');
      }
    }
    const r = await net.host.connect({ proto: 'udp', addr: net.addrs.inet.v4, port: 7001 });
    expect(r).toMatchObject({ ok: false, error: 'ECONNREFUSED' });
  });

  it('pings, and counts echo requests on the internet side', async () => {
    const before = await net.inet.icmpEchoCount(net.addrs.inet.v4);
    const r4 = await net.host.ping(net.addrs.inet.v4, { count: 2 });
    expect(r4).toMatchObject({ ok: true, transmitted: 2, received: 2 });
    const r6 = await net.host.ping(net.addrs.inet.extra6[1]!, { user: 'egd-app1' });
    expect(r6.ok).toBe(true);
    expect(await net.inet.icmpEchoCount(net.addrs.inet.v4)).toBe(before + 2);
    expect(await net.inet.icmpEchoCount(net.addrs.inet.extra6[1])).toBe(1);
  });

  it('keeps a session open both ways: each line reaches the line server, which records and echoes it', async () => {
    const out = await net.inet.listen({ proto: 'tcp', addr: net.addrs.inet.v6, port: 7200, lines: true });
    const back = await net.host.listen({ proto: 'tcp', addr: net.addrs.host.v4, port: 7201, lines: true });
    try {
      const s = await net.host.session({ addr: net.addrs.inet.v6, port: 7200, user: 'egd-app1' });
      expect(s).toMatchObject({ connected: true, local: net.addrs.host.v6 });
      expect(await s.send('one')).toBe(true);
      expect(await s.send('two')).toBe(true);
      expect(s.received).toEqual(['echo one', 'echo two']);
      const seen = await out.seen();
      expect(seen.map((r) => [r.text, r.peer, r.peerPort, r.bytes])).toEqual([
        ['one', net.addrs.host.v6, s.localPort, 4],
        ['two', net.addrs.host.v6, s.localPort, 4],
      ]);
      await s.close();
      // the other way: a client on the internet side, a server on the host
      const r = await net.inet.session({ addr: net.addrs.host.v4, port: 7201 });
      expect(await r.send('three')).toBe(true);
      expect((await back.seen()).map((x) => [x.text, x.peer])).toEqual([['three', net.addrs.inet.v4]]);
      await r.close();
      const refused = await net.host.session({ addr: net.addrs.inet.v4, port: 7202 });
      expect(refused).toMatchObject({ connected: false, error: 'ECONNREFUSED' });
      expect(await refused.send('x', 100)).toBe(false);
    } finally {
      await out.close();
      await back.close();
    }
  });

  it('adds internet addresses on demand (documentation ranges only)', async () => {
    await net.inet.addAddr('203.0.113.77');
    expect((await net.host.ping('203.0.113.77')).ok).toBe(true);
    expect(await net.inet.icmpEchoCount('203.0.113.77')).toBe(1);
    await expect(net.inet.addAddr('10.0.0.1')).rejects.toThrow(/documentation ranges/);
  });
});

describe('identity', () => {
  it('runs a command in the cgroup asked for', async () => {
    const out = await net.host.run('cat', ['/proc/self/cgroup'], { cgroup: 'apps/a1' });
    expect(out.split('\n')).toContain('0::/apps/a1');
    expect(fs.existsSync(net.host.cgroupFsPath('apps/a1'))).toBe(true);
    expect(net.host.cgroupId('apps/a1')).toBeGreaterThan(1n);
    // and without one, in the root
    expect((await net.host.run('cat', ['/proc/self/cgroup'])).split('\n')).toContain('0::/');
  });

  it('runs a command as the user and group asked for', async () => {
    expect((await net.host.run('id', ['-u'], { user: 'egd-app1' })).trim()).toBe(String(users.app1.uid));
    expect((await net.host.run('id', ['-g'], { user: 'egd-app1' })).trim()).toBe(String(users.app1.gid));
    const both = await net.host.run('id', [], { user: users.app2.uid, group: 'egd-grp', cgroup: 'apps/a2' });
    expect(both).toContain(`uid=${users.app2.uid}(egd-app2) gid=${users.grp.gid}(egd-grp)`);
    expect(both).not.toContain('groups=0');
    expect(users.app3.gid).toBe(users.grp.gid);
  });

  it('creates and removes cgroups', async () => {
    net.host.mkCgroup('/tmpcg/x/');
    expect(fs.existsSync(net.host.cgroupFsPath('tmpcg/x'))).toBe(true);
    await net.host.rmCgroup('tmpcg/x');
    await net.host.rmCgroup('tmpcg');
    expect(fs.existsSync(net.host.cgroupFsPath('tmpcg'))).toBe(false);
    expect(() => net.host.mkCgroup('a/../b')).toThrow(/bad cgroup path/);
  });

  it('runs node and tsx scripts in the host namespace', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'egd-harness-'));
    try {
      const script = path.join(dir, 'probe.ts');
      fs.writeFileSync(
        script,
        [
          "import * as os from 'node:os';",
          'const names: string[] = Object.keys(os.networkInterfaces()).sort();',
          'console.log(JSON.stringify({ names, arg: process.argv[2] }));',
        ].join('\n'),
      );
      const r = await net.host.node(script, ['hello']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toEqual({ names: ['eth0', 'lo'], arg: 'hello' });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('nftables in the host namespace', () => {
  it('a socket cgroupv2 drop rule stops the cgroup, not the root', async () => {
    const addr = net.addrs.inet.v4;
    const srv = await net.inet.listen({ proto: 'tcp', addr, port: 7100 });
    net.host.mkCgroup('apps/a1');
    await net.host.nft({
      stdin: [
        'table inet harnesstest {',
        '  set apps { typeof socket cgroupv2 level 1; }',
        '  chain out { type filter hook output priority 0; policy accept;',
        '    socket cgroupv2 level 1 @apps drop',
        '  }',
        '}',
        'add element inet harnesstest apps { "apps" }',
      ].join('\n'),
    });
    try {
      const denied = await net.host.connect({ proto: 'tcp', addr, port: 7100, cgroup: 'apps/a1', timeoutMs: 800 });
      const allowed = await net.host.connect({ proto: 'tcp', addr, port: 7100 });
      expect(denied.ok).toBe(false);
      expect(allowed.ok).toBe(true);
      const seen = await srv.seen();
      expect(seen).toHaveLength(1);
      expect(seen[0]?.peer).toBe(net.addrs.host.v4);
    } finally {
      await net.host.nft(['delete', 'table', 'inet', 'harnesstest']);
      await srv.close();
    }
    expect((await net.host.nft(['list', 'ruleset'])).stdout.trim()).toBe('');
  });

  it('a bounded sender loop keeps trying while denied, and stops', async () => {
    const addr = net.addrs.inet.extra4[1]!;
    const srv = await net.inet.listen({ proto: 'udp', addr, port: 7200 });
    await net.host.nft({
      stdin: [
        'table inet harnessloop {',
        '  chain out { type filter hook output priority 0; policy accept;',
        `    meta skuid ${users.app1.uid} udp dport 7200 drop`,
        '  }',
        '}',
      ].join('\n'),
    });
    try {
      const loop = net.host.sendLoop({
        proto: 'udp',
        addr,
        port: 7200,
        user: 'egd-app1',
        cgroup: 'apps/loop',
        count: 1000,
        intervalMs: 20,
        maxMs: 5000,
        attemptTimeoutMs: 100,
      });
      let res: Awaited<ReturnType<typeof loop.stop>>;
      try {
        await until('3 attempts of the send loop', () => loop.progress.attempts >= 3, { timeoutMs: 4000 });
      } finally {
        // Stopped whether or not the attempts came: a failure here leaves no loop running.
        res = await loop.stop();
      }
      expect(res.attempts).toBeGreaterThanOrEqual(3);
      expect(res.successes).toBe(0);
      expect(await srv.count()).toBe(0);
      // the same loop as another user gets through, and ends by itself at `count`
      const ok = await net.host.sendLoop({
        proto: 'udp',
        addr,
        port: 7200,
        user: 'egd-app2',
        count: 5,
        intervalMs: 10,
        maxMs: 5000,
      }).done;
      expect(ok).toEqual({ attempts: 5, successes: 5, errors: {} });
      expect(await srv.count()).toBe(5);
    } finally {
      await net.host.nft(['delete', 'table', 'inet', 'harnessloop']);
      await srv.close();
    }
  });
});

describe('lifecycle', () => {
  it('two nets coexist without colliding, and destroy removes all of one', async () => {
    const t0 = Date.now();
    const other = await createTestNet();
    timings['create2'] = Date.now() - t0;
    let destroyed = false;
    try {
      expect(other.id).not.toBe(net.id);
      // same addresses, separate worlds: each server sees only its own net's clients
      const a = await net.inet.listen({ proto: 'tcp', addr: net.addrs.inet.v4, port: 7300 });
      const b = await other.inet.listen({ proto: 'tcp', addr: other.addrs.inet.v4, port: 7300 });
      expect((await other.host.connect({ proto: 'tcp', addr: other.addrs.inet.v4, port: 7300 })).ok).toBe(true);
      expect((await other.host.connect({ proto: 'tcp', addr: other.addrs.inet.v4, port: 7300 })).ok).toBe(true);
      expect((await net.host.connect({ proto: 'tcp', addr: net.addrs.inet.v4, port: 7300 })).ok).toBe(true);
      expect(await a.count()).toBe(1);
      expect(await b.count()).toBe(2);
      await a.close();
      // a table in one host namespace is not in the other
      await other.host.nft(['add', 'table', 'inet', 'only_other']);
      expect((await net.host.nft(['list', 'ruleset'])).stdout).not.toContain('only_other');
      // leave a server and a background process running: destroy must take them down
      const stray = other.host.spawn('sleep', ['30'], { cgroup: 'apps/stray' });
      const t1 = Date.now();
      await other.destroy();
      timings['destroy2'] = Date.now() - t1;
      destroyed = true;
      await other.destroy(); // idempotent
      expect(harnessNamespaces().filter((n) => n.includes(other.id))).toEqual([]);
      expect(fs.existsSync(`${RUN_DIR}/${other.id}.json`)).toBe(false);
      expect(stray.exitCode !== null || stray.signalCode !== null).toBe(true);
      await expect(other.host.run('true')).rejects.toThrow(/destroyed/);
      // the first net is untouched
      expect((await net.host.ping(net.addrs.inet.v6)).ok).toBe(true);
    } finally {
      if (!destroyed) await other.destroy();
    }
  });

  it('removes what a crashed run left behind', async () => {
    // A "crashed run": a record whose process is gone, its namespaces, a process inside one.
    const dead = spawnSync('true');
    const id = randomBytes(3).toString('hex');
    const host = `egdt${id}-host`;
    const inet = `egdt${id}-inet`;
    spawnSync('ip', ['netns', 'add', host]);
    spawnSync('ip', ['netns', 'add', inet]);
    const orphan = spawn('nsenter', [`--net=/run/netns/${host}`, 'sleep', '30'], { stdio: 'ignore' });
    // Inside once nsenter has joined the namespace (it then execs sleep in the same process).
    const hostNs = fs.statSync(`/run/netns/${host}`).ino;
    await until(`pid ${orphan.pid} to be in ${host}`, () => {
      try {
        return fs.statSync(`/proc/${orphan.pid}/ns/net`).ino === hostNs;
      } catch {
        return false;
      }
    });
    fs.writeFileSync(
      `${RUN_DIR}/${id}.json`,
      JSON.stringify({
        id,
        pid: dead.pid,
        pidStart: '1',
        host,
        inet,
        cgroups: [],
        created: new Date().toISOString(),
      }),
    );
    // and a namespace with the harness's name pattern but no record at all
    const id2 = randomBytes(3).toString('hex');
    spawnSync('ip', ['netns', 'add', `egdt${id2}-inet`]);

    const res = cleanupStale();
    // (a harness starting in another test file at the same moment may have cleaned some first)
    expect(res.namespaces.every((n) => n.startsWith('egdt'))).toBe(true);
    expect(harnessNamespaces().filter((n) => n.includes(id) || n.includes(id2))).toEqual([]);
    expect(fs.existsSync(`${RUN_DIR}/${id}.json`)).toBe(false);
    await new Promise((r) => (orphan.exitCode !== null || orphan.signalCode !== null ? r(null) : orphan.once('exit', r)));
    expect(orphan.signalCode).toBe('SIGKILL');
    // the live net was left alone
    expect(harnessNamespaces()).toContain(net.host.netns);
    expect((await net.host.connect({ proto: 'tcp', addr: net.addrs.unused.v4, port: 1 })).error).toBe('ECONNREFUSED');
  });
});
