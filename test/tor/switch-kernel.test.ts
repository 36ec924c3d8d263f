import { spawn, type ChildProcess } from 'node:child_process';
import { lstatSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createTestNet, harnessUnavailableReason, type Server, type TestNet } from '../harness/index.js';
import { policyDir } from '../support/policy-dir.js';
import { printed } from '../support/wait.js';

/**
 * `egressctl tor enable` really confines: in the harness's host namespace,
 * with the policy of a staging root applied to its table (--root … --apply),
 * apt's user `_apt` reaches Tor's SOCKS port and nothing else; disable lets
 * it out again and leaves the staging root as it was. A plain listener,
 * owned by Tor's user, stands in for Tor (the tornet helper's tests run the
 * real one end to end).
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const unavailable = harnessUnavailableReason();

let net: TestNet;
let stage: string;
let direct: Server;
let fakeTor: ChildProcess | undefined;

function tree(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string) => {
    for (const name of readdirSync(join(dir, rel)).sort()) {
      const path = join(rel, name);
      if (path === 'var' || path.startsWith('var/')) continue;
      const stat = lstatSync(join(dir, path));
      const meta = `${(stat.mode & 0o7777).toString(8)} ${stat.uid}:${stat.gid}`;
      if (stat.isSymbolicLink()) out[path] = `link ${readlinkSync(join(dir, path))}`;
      else if (stat.isDirectory()) {
        out[`${path}/`] = `dir ${meta}`;
        walk(path);
      } else out[path] = `file ${meta} ${readFileSync(join(dir, path)).toString('hex')}`;
    }
  };
  walk('');
  return out;
}

const egressctl = (...args: string[]) => net.host.node(CLI, args, { env: { ...process.env }, timeoutMs: 60_000 });

describe.skipIf(unavailable)(`tor enable confines the updaters in the kernel ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  beforeAll(async () => {
    net = await createTestNet();
    stage = policyDir(
      {
        'usr/bin/tor': '#!/bin/false\n',
        'etc/tor/torrc': '# nothing\n',
        'usr/share/tor/tor-service-defaults-torrc':
          'SocksPort 9050\nControlSocket /run/tor/control\nCookieAuthentication 1\nCookieAuthFile /run/tor/control.authcookie\n',
        'etc/apt/apt.conf.d/70debconf': 'DPkg::Pre-Install-Pkgs {"/usr/sbin/dpkg-preconfigure --apt || true";};\n',
        'etc/egressd/00-base.yaml': 'defaults: {egress: allow}\nidentities:\n  apt: {user: _apt}\n',
      },
      { keep: true },
    );
    direct = await net.inet.listen({ proto: 'tcp', addr: '192.0.2.2', port: 8443 });
    // Tor's stand-in: a listener on the SOCKS port owned by Tor's user, in the host's network namespace.
    fakeTor = spawn(
      'nsenter',
      [
        `--net=/proc/${net.host.pid}/ns/net`,
        'setpriv',
        '--reuid=debian-tor',
        '--regid=debian-tor',
        '--clear-groups',
        // Debian's, not a shim in root's home that Tor's user cannot read.
        '/usr/bin/python3',
        '-c',
        'import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(("127.0.0.1",9050))\ns.listen(16)\nprint("ready",flush=True)\nwhile True:\n  c,_=s.accept()\n  c.close()\n',
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    await printed(fakeTor, 'stdout', 'ready', 10_000);
  });
  afterAll(async () => {
    fakeTor?.kill('SIGKILL');
    await net?.destroy();
    if (stage) rmSync(stage, { recursive: true, force: true });
  });

  it("enable: _apt's direct connection is dropped, its connection to the SOCKS port passes; disable: it goes direct again, the root as it was", async () => {
    const before = tree(stage);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, user: '_apt' })).toMatchObject({ ok: true });
    expect(await direct.count()).toBe(1);
    await direct.reset();

    const enabled = await egressctl('tor', 'enable', '--root', stage, '--apply', '--updaters', 'apt', '--json');
    expect(enabled.stderr).toContain('updates over Tor: on');
    expect(enabled.code).toBe(0);
    expect(JSON.parse(enabled.stdout)).toMatchObject({ action: 'enable', applied: true, changed: true });
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, user: '_apt', timeoutMs: 800 })).toMatchObject({
      ok: false,
      error: 'ETIMEDOUT',
    });
    expect(await direct.count()).toBe(0);
    expect(await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: 9050, user: '_apt' })).toMatchObject({ connected: true });
    // Only the updaters are confined.
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443 })).toMatchObject({ ok: true });
    await direct.reset();

    const status = await egressctl('tor', 'status', '--root', stage, '--json');
    expect(JSON.parse(status.stdout)).toMatchObject({ torUpdates: true, from: 'switches.json' });
    expect(status.stderr).toMatch(/^updates: blocked — Tor /);
    expect(status.code).toBe(1);

    // egressctl status says the same line, from the live table.
    const whole = await net.host.node(CLI, ['status', join(stage, 'etc/egressd'), '--json'], {
      env: { ...process.env, EGRESSD_STATE_DIR: join(stage, 'var/lib/egressd') },
      timeoutMs: 60_000,
    });
    expect(whole.stderr).toMatch(/^updates: blocked — Tor /m);
    expect(JSON.parse(whole.stdout)).toMatchObject({ updates: { torUpdates: true } });

    // Twice is once: nothing written, still confined.
    const again = await egressctl('tor', 'enable', '--root', stage, '--apply', '--updaters', 'apt', '--json');
    expect(again.code).toBe(0);
    expect(JSON.parse(again.stdout)).toMatchObject({ changed: false, applied: true });

    const disabled = await egressctl('tor', 'disable', '--root', stage, '--apply');
    expect(disabled.code).toBe(0);
    expect(await net.host.connect({ proto: 'tcp', addr: '192.0.2.2', port: 8443, user: '_apt' })).toMatchObject({ ok: true });
    expect(await direct.count()).toBe(1);
    expect(tree(stage)).toEqual(before);
    const off = await egressctl('tor', 'status', '--root', stage);
    expect(off.stderr).toContain('updates: direct (updates over Tor off)');
    const wholeOff = await net.host.node(CLI, ['status', join(stage, 'etc/egressd')], {
      env: { ...process.env, EGRESSD_STATE_DIR: join(stage, 'var/lib/egressd') },
      timeoutMs: 60_000,
    });
    expect(wholeOff.stderr).toContain('updates: direct (updates over Tor off)');
  });
});
