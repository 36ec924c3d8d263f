import { spawnSync } from 'node:child_process';
import { chmodSync, cpSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { ErrorCode, isEgressError } from '../../src/errors.js';
import { APT_DROP_IN } from '../../src/tor/files.js';
import { listenerAt } from '../../src/tor/listener.js';
import { disableTor, enableTor, readTorRecord, TOR_RECORD_FILE, type TorSwitchDeps } from '../../src/tor/switch.js';
import { policyDir } from '../support/policy-dir.js';
import { runEgressctl } from '../support/cli-run.js';

/**
 * The switch on a staging root: every system path under it, nothing
 * applied (the kernel test, switch-kernel.test.ts, applies). Each test
 * snapshots the whole tree and compares it byte for byte.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const TORRC_DEBIAN = '## Debian-like torrc: nothing set\n#SocksPort 9050\n';
const DEFAULTS =
  'SocksPort unix:/run/tor/socks WorldWritable\nSocksPort 9050\nControlSocket /run/tor/control GroupWritable RelaxDirModeCheck\nCookieAuthentication 1\nCookieAuthFile /run/tor/control.authcookie\n';

function stagingRoot(extra: Record<string, string> = {}): string {
  const root = policyDir({
    'usr/bin/tor': '#!/bin/false\n',
    'usr/share/tor/tor-service-defaults-torrc': DEFAULTS,
    'etc/tor/torrc': TORRC_DEBIAN,
    'etc/apt/apt.conf.d/20auto-upgrades': 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n',
    'etc/apt/apt.conf.d/70debconf': '// Pre-configure all packages with debconf\nDPkg::Pre-Install-Pkgs {"/usr/sbin/dpkg-preconfigure --apt || true";};\n',
    // A unit drop-in directory with someone else's file: it and its directory stay.
    'etc/systemd/system/fwupd.service.d/local.conf': '[Service]\nNice=5\n',
    'etc/egressd/00-base.yaml': 'defaults: {egress: allow}\n',
    ...extra,
  });
  cpSync(join(ROOT, 'policies/50-tor-updates.yaml'), join(root, 'etc/egressd/50-tor-updates.yaml'));
  return root;
}

function deps(root: string, more: Partial<TorSwitchDeps> = {}): TorSwitchDeps {
  return { root, stateDir: join(root, 'var/lib/egressd'), policyDir: '/etc/egressd', uidOf: () => 104, now: () => new Date('2026-12-04T12:00:00Z'), ...more };
}

const ALL = { socks: '127.0.0.1:9050', updaters: ['apt', 'packagekit', 'unattended-upgrades', 'fwupd', 'flatpak'], dryRun: false };

/** Every path under `dir` with its kind, bytes, target, mode and owner: what "byte-identical" means here. */
function tree(dir: string, skip: (rel: string) => boolean = () => false): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (rel: string) => {
    for (const name of readdirSync(join(dir, rel)).sort()) {
      const path = join(rel, name);
      if (skip(path)) continue;
      const stat = lstatSync(join(dir, path));
      const meta = `${(stat.mode & 0o7777).toString(8)} ${stat.uid}:${stat.gid}`;
      if (stat.isSymbolicLink()) out[path] = `link ${readlinkSync(join(dir, path))} ${meta}`;
      else if (stat.isDirectory()) {
        out[`${path}/`] = `dir ${meta}`;
        walk(path);
      } else out[path] = `file ${meta} ${readFileSync(join(dir, path)).toString('hex')}`;
    }
  };
  walk('');
  return out;
}
const stateFree = (rel: string) => rel === 'var' || rel.startsWith('var/');

async function expectError(promise: Promise<unknown>, code: string): Promise<{ message: string; details: readonly string[] }> {
  try {
    await promise;
  } catch (error) {
    if (!isEgressError(error)) throw error;
    expect(error.code).toBe(code);
    return { message: error.message, details: error.details };
  }
  throw new Error(`expected ${code}, got success`);
}

describe('tor enable / disable on a staging root', () => {
  it('enable writes apt, unit and policy drop-ins; twice changes nothing (byte-identical files, same record)', async () => {
    const root = stagingRoot();
    const first = await enableTor(ALL, deps(root));
    expect(first.changed).toBe(true);
    const apt = readFileSync(join(root, APT_DROP_IN), 'utf8');
    expect(apt).toContain('Acquire::http::Proxy "socks5h://egressd-apt-frontends:tor@127.0.0.1:9050";');
    expect(apt).toContain('Acquire::https::Proxy "socks5h://');
    expect(apt).toContain('Binary::apt-get::Acquire::http::Proxy "socks5h://egressd-apt:tor@127.0.0.1:9050";');
    expect(apt).toContain('Acquire::EnableSrvRecords "false";');
    const fwupd = readFileSync(join(root, 'etc/systemd/system/fwupd-refresh.service.d/egressd-tor.conf'), 'utf8');
    expect(fwupd).toContain('"https_proxy=socks5h://egressd-fwupd:tor@127.0.0.1:9050"');
    expect(fwupd).toContain('"ALL_PROXY=socks5h://egressd-fwupd:tor@127.0.0.1:9050"');
    const flatpak = readFileSync(join(root, 'etc/systemd/system/flatpak-system-helper.service.d/egressd-tor.conf'), 'utf8');
    expect(flatpak).toContain('egressd-flatpak:tor@');
    expect(readFileSync(join(root, 'etc/egressd/90-tor.yaml'), 'utf8')).toContain('updaters: [apt, packagekit, unattended-upgrades, fwupd, flatpak-system]');
    // Debian's torrc includes nothing: no snippet, and the defaults already isolate by SOCKS credentials.
    expect(existsSync(join(root, 'etc/tor/torrc.d'))).toBe(false);
    expect(first.warnings.join('\n')).toContain('includes no drop-in directory');
    // Debian's world-writable SOCKS socket, which no table sees: said, with what to do.
    expect(first.warnings.join('\n')).toContain(
      "Tor's configuration also has SocksPort unix:/run/tor/socks WorldWritable: every local program reaches Tor there, a system domain's members and anyone under lockdown included",
    );
    const after = tree(root);
    const record = readFileSync(join(root, 'var/lib/egressd', TOR_RECORD_FILE), 'utf8');
    const second = await enableTor(ALL, deps(root, { now: () => new Date('2027-01-01T00:00:00Z') }));
    expect(second.changed).toBe(false);
    expect(tree(root)).toEqual(after);
    expect(readFileSync(join(root, 'var/lib/egressd', TOR_RECORD_FILE), 'utf8')).toBe(record);
  });

  it("another SOCKS port or a transparent or DNS port the admin's torrc sets is said: every local program would leave through Tor there", async () => {
    const root = stagingRoot({
      'etc/tor/torrc': '%include /etc/tor/torrc.d/\n',
      'etc/tor/torrc.d/00-local.conf': 'SocksPort 127.0.0.1:9060\nTransPort 9040\nDNSPort 0\n',
    });
    const enabled = await enableTor({ ...ALL, socks: '127.0.0.1:9150' }, deps(root));
    const warned = enabled.warnings.join('\n');
    expect(warned).toContain("Tor's configuration also has SocksPort 127.0.0.1:9060: every local program reaches Tor there");
    expect(warned).toContain("Tor's configuration has TransPort 9040: every local program reaches Tor there");
    // A port set to 0 is off.
    expect(warned).not.toContain('DNSPort');
    await disableTor({ force: false }, deps(root));
  });

  it('enable → disable leaves every file byte-identical, those that were there before included; a torrc with %include gets a snippet', async () => {
    const root = stagingRoot({
      'etc/tor/torrc': '%include /etc/tor/torrc.d/\nLog notice syslog\n',
      'etc/tor/torrc.d/00-local.conf': 'ExitNodes {de}\n',
      // A policy drop-in of egressd's from before (an older enable whose record is gone): overwritten, and restored.
      'etc/egressd/90-tor.yaml': '# Written by egressd ("egressctl tor enable"): old\ntor: {enabled: false}\n',
    });
    const before = tree(root);
    const enabled = await enableTor({ ...ALL, socks: '127.0.0.1:9150' }, deps(root));
    const snippet = readFileSync(join(root, 'etc/tor/torrc.d/egressd-tor.conf'), 'utf8');
    expect(snippet).toContain('SocksPort 127.0.0.1:9150 IsolateClientAddr IsolateSOCKSAuth IsolateClientProtocol IsolateDestPort IsolateDestAddr');
    // The only SOCKS port: the defaults' others (9050, the world-writable unix socket), which any SocksPort in torrc replaces,
    // are not carried over — each would let every local program out through Tor, and a unix socket never meets the table.
    expect(snippet.match(/^SocksPort /gm)).toHaveLength(1);
    expect(snippet).not.toContain('unix:/run/tor/socks');
    expect(snippet).toContain('CookieAuthentication 1');
    expect(enabled.files.map((f) => f.path)[0]).toBe(join(root, 'etc/tor/torrc.d/egressd-tor.conf'));
    expect(tree(root)).not.toEqual(before);
    const disabled = await disableTor({ force: false }, deps(root));
    expect(disabled.changed).toBe(true);
    expect(tree(root, stateFree)).toEqual(before);
    expect(readTorRecord(join(root, 'var/lib/egressd'))).toBeUndefined();
    // Disable again: nothing to do, nothing changed.
    expect((await disableTor({ force: false }, deps(root))).changed).toBe(false);
    expect(tree(root, stateFree)).toEqual(before);
  });

  it('an existing apt proxy, in any apt.conf.d file and in nested syntax, is reported and nothing is written', async () => {
    const root = stagingRoot({ 'etc/apt/apt.conf.d/01proxy': '# corporate\nAcquire {\n  http { Proxy "http://proxy.example:3128"; };\n};\n' });
    const before = tree(root);
    const error = await expectError(enableTor(ALL, deps(root)), ErrorCode.TorConflict);
    expect(error.details.join('\n')).toContain(
      `${join(root, 'etc/apt/apt.conf.d/01proxy')}:3: apt already has a proxy: acquire::http::proxy "http://proxy.example:3128"`,
    );
    expect(tree(root)).toEqual(before);
  });

  it("a file of the name enable writes that is not egressd's is reported, not overwritten", async () => {
    const root = stagingRoot({ 'etc/systemd/system/packagekit.service.d/egressd-tor.conf': '[Service]\nEnvironment=MINE=1\n' });
    const before = tree(root);
    const error = await expectError(enableTor(ALL, deps(root)), ErrorCode.TorConflict);
    expect(error.details.join('\n')).toContain("packagekit.service.d/egressd-tor.conf is there already and is not egressd's");
    expect(tree(root)).toEqual(before);
  });

  it('a later policy file that sets tor is reported (it would take the switch back)', async () => {
    const root = stagingRoot({ 'etc/egressd/95-mine.yaml': 'tor: {enabled: false}\n' });
    const before = tree(root);
    const error = await expectError(enableTor(ALL, deps(root)), ErrorCode.TorConflict);
    expect(error.details.join('\n')).toContain('95-mine.yaml');
    expect(tree(root)).toEqual(before);
  });

  it('Tor not installed: a clear error, nothing written', async () => {
    const root = stagingRoot();
    spawnSync('rm', [join(root, 'usr/bin/tor')]);
    const before = tree(root);
    const error = await expectError(enableTor(ALL, deps(root)), ErrorCode.TorMissing);
    expect(error.message).toContain('Tor is not installed');
    expect(tree(root)).toEqual(before);
  });

  it('bad --socks and --updaters are usage errors naming the flag', async () => {
    const root = stagingRoot();
    expect((await expectError(enableTor({ ...ALL, socks: '127.0.0.1' }, deps(root)), ErrorCode.Usage)).message).toContain('--socks');
    expect((await expectError(enableTor({ ...ALL, updaters: ['apt', 'snapd'] }, deps(root)), ErrorCode.Usage)).message).toContain('"snapd"');
  });

  it('--dry-run shows every file (new: content) and changes nothing', async () => {
    const root = stagingRoot();
    const before = tree(root);
    const dry = await enableTor({ ...ALL, dryRun: true }, deps(root));
    expect(tree(root)).toEqual(before);
    const apt = dry.files.find((f) => f.path === join(root, APT_DROP_IN));
    expect(apt?.action).toBe('write');
    expect(apt?.shown).toContain('+ Acquire::EnableSrvRecords "false";');
    expect(dry.files.map((f) => f.path)).toContain(join(root, 'etc/egressd/90-tor.yaml'));
  });

  it('a failing apply undoes every file written before it (step 5 of 5)', async () => {
    const root = stagingRoot();
    const before = tree(root);
    const refused = () => Promise.reject(new (class extends Error {})('nft refused'));
    await expect(enableTor(ALL, deps(root, { apply: refused }))).rejects.toThrow('nft refused');
    expect(tree(root, stateFree)).toEqual(before);
    expect(readTorRecord(join(root, 'var/lib/egressd'))).toBeUndefined();
  });
});

describe("tor enable / disable: changes and someone else's edits", () => {
  it('enable again with fewer updaters puts back what is no longer wanted; disable still restores the root byte for byte', async () => {
    const root = stagingRoot();
    const before = tree(root);
    await enableTor(ALL, deps(root));
    expect(existsSync(join(root, 'etc/systemd/system/flatpak-system-helper.service.d'))).toBe(true);
    // A dry run over files egressd wrote: a diff of each.
    const dry = await enableTor({ ...ALL, socks: '127.0.0.1:9150', dryRun: true }, deps(root));
    const aptShown = dry.files.find((f) => f.path === join(root, APT_DROP_IN))?.shown ?? [];
    expect(aptShown).toContain('- Acquire::http::Proxy "socks5h://egressd-apt-frontends:tor@127.0.0.1:9050";');
    expect(aptShown).toContain('+ Acquire::http::Proxy "socks5h://egressd-apt-frontends:tor@127.0.0.1:9150";');
    expect(aptShown).toContain('  Acquire::EnableSrvRecords "false";');
    const fewer = await enableTor({ ...ALL, updaters: ['apt', 'fwupd'] }, deps(root));
    expect(fewer.files.filter((f) => f.action === 'restore').map((f) => f.path)).toEqual([
      join(root, 'etc/systemd/system/packagekit.service.d/egressd-tor.conf'),
      join(root, 'etc/systemd/system/flatpak-system-helper.service.d/egressd-tor.conf'),
    ]);
    // The directories enable made go with their files; fwupd's own (someone else's local.conf) stays.
    expect(existsSync(join(root, 'etc/systemd/system/flatpak-system-helper.service.d'))).toBe(false);
    expect(readFileSync(join(root, 'etc/egressd/90-tor.yaml'), 'utf8')).toContain('updaters: [apt, fwupd]');
    await disableTor({ force: false }, deps(root));
    expect(tree(root, stateFree)).toEqual(before);
  });

  it('disable leaves a file someone else changed since enable, and says so; --force puts back what was there before', async () => {
    const root = stagingRoot();
    const before = tree(root);
    await enableTor(ALL, deps(root));
    const apt = join(root, APT_DROP_IN);
    writeFileSync(apt, `${readFileSync(apt, 'utf8')}// an admin's line\n`);
    const edited = tree(root);
    const error = await expectError(disableTor({ force: false }, deps(root)), ErrorCode.TorConflict);
    expect(error.details.join('\n')).toContain(`${apt} is neither what enable wrote nor what was there before`);
    expect(tree(root)).toEqual(edited);
    await disableTor({ force: true }, deps(root));
    expect(tree(root, stateFree)).toEqual(before);
  });

  it('the command: exit 1 for a conflict, 3 for Tor missing, 2 for bad usage; --help documents the exit codes', async () => {
    const conflicted = stagingRoot({ 'etc/apt/apt.conf.d/01proxy': 'Acquire::http::Proxy "http://proxy.example:3128";\n' });
    const one = await runEgressctl(['tor', 'enable', '--root', conflicted]);
    expect(one.code).toBe(1);
    expect(one.err).toContain('apt already has a proxy');
    const missing = stagingRoot();
    spawnSync('rm', [join(missing, 'usr/bin/tor')]);
    expect((await runEgressctl(['tor', 'enable', '--root', missing])).code).toBe(3);
    expect((await runEgressctl(['tor', 'enable', '--updaters', 'snapd', '--root', missing])).code).toBe(2);
    expect((await runEgressctl(['tor', 'disable', '--socks', '127.0.0.1:9050'])).code).toBe(2);
    const help = await runEgressctl(['tor', '--help']);
    expect(help.err).toMatch(/Exit status: 0 done .* 1 someone\s+else's configuration is in the way/s);
    const ok = await runEgressctl(['tor', 'enable', '--root', stagingRoot(), '--json']);
    expect(ok.code).toBe(0);
    expect(JSON.parse(ok.out)).toMatchObject({ action: 'enable', changed: true, applied: false });
  });
});

const hasTor = spawnSync('tor', ['--version']).status === 0;

describe.skipIf(!hasTor || process.getuid?.() !== 0)("Tor's side of it", () => {
  it('real Tor accepts the snippet enable writes where torrc includes a directory', async () => {
    const root = stagingRoot({ 'etc/tor/torrc': '%include /etc/tor/torrc.d/\n' });
    await enableTor(ALL, deps(root));
    // torrc as the staged one, with its include and data directory inside the staging root; checked by tor as Tor's user.
    writeFileSync(join(root, 'verify-torrc'), `%include ${join(root, 'etc/tor/torrc.d')}/\nDataDirectory ${join(root, 'tor-data')}\n`);
    mkdirSync(join(root, 'tor-data'), { mode: 0o700 });
    chmodSync(root, 0o755);
    spawnSync('chown', ['-R', 'debian-tor', join(root, 'tor-data')]);
    const verify = spawnSync(
      'tor',
      ['--verify-config', '--defaults-torrc', join(root, 'usr/share/tor/tor-service-defaults-torrc'), '-f', join(root, 'verify-torrc'), '--User', 'debian-tor'],
      {
        encoding: 'utf8',
        timeout: 30_000,
      },
    );
    expect(verify.stdout).toContain('Including configuration file');
    expect(verify.stdout + verify.stderr).toContain('Configuration was valid');
  });

  it('a SocksPort in torrc on the port the snippet would open is reported (Tor would not start), nothing written', async () => {
    const root = stagingRoot({ 'etc/tor/torrc': 'SocksPort 9050 IsolateDestAddr\n%include /etc/tor/torrc.d/\n' });
    mkdirSync(join(root, 'etc/tor/torrc.d'));
    const before = tree(root);
    const error = await expectError(enableTor(ALL, deps(root)), ErrorCode.TorConflict);
    expect(error.details.join('\n')).toContain("SocksPort 9050 IsolateDestAddr is the port egressd's snippet would open too");
    expect(tree(root)).toEqual(before);
  });
});

describe('the SOCKS port, looked at by its listening socket (sock_diag)', () => {
  let server: Server | undefined;
  afterEach(() => server?.close());
  const listen = () =>
    new Promise<number>((resolve) => {
      server = createServer().listen(0, '127.0.0.1', () => resolve((server!.address() as { port: number }).port));
    });

  it("taken by something that is not Tor's user: reported, nothing written", async () => {
    const port = await listen();
    expect(listenerAt({ host: '127.0.0.1', port, family: 4 })).toEqual({ uid: process.getuid!() });
    const root = stagingRoot();
    const before = tree(root);
    // Root's socket is Tor's when Debian starts it (it opens its listeners before it becomes its User): this one is another user's.
    const other = (socks: Parameters<typeof listenerAt>[0]) => (listenerAt(socks) ? { uid: 1001 } : null);
    const error = await expectError(enableTor({ ...ALL, socks: `127.0.0.1:${port}` }, deps(root, { socksListener: other })), ErrorCode.TorConflict);
    expect(error.details.join('\n')).toContain(`127.0.0.1:${port} is taken by something that is not Tor: its socket belongs to uid 1001`);
    expect(tree(root)).toEqual(before);
  });

  it('held by root: that is Tor as Debian starts it, enable goes ahead', async () => {
    const port = await listen();
    const asRoot = (socks: Parameters<typeof listenerAt>[0]) => (listenerAt(socks) ? { uid: 0 } : null);
    const ok = await enableTor({ ...ALL, socks: `127.0.0.1:${port}` }, deps(stagingRoot(), { socksListener: asRoot }));
    expect(ok.warnings.join('\n')).not.toContain('nothing listens');
  });

  it("held by Tor's user: enable goes ahead; nothing listening: a warning that updates fail until Tor runs", async () => {
    const port = await listen();
    const root = stagingRoot();
    const ok = await enableTor({ ...ALL, socks: `127.0.0.1:${port}` }, deps(root, { socksListener: listenerAt, uidOf: () => process.getuid!() }));
    expect(ok.warnings.join('\n')).not.toContain('nothing listens');
    server!.close();
    await new Promise((r) => setTimeout(r, 50));
    const root2 = stagingRoot();
    const warned = await enableTor({ ...ALL, socks: `127.0.0.1:${port}` }, deps(root2, { socksListener: listenerAt }));
    expect(warned.warnings.join('\n')).toContain(`nothing listens on 127.0.0.1:${port} now: updates fail (they never go direct) until Tor runs`);
  });
});

describe('a read-only /etc/systemd (a read-only bind mount in a private mount namespace)', () => {
  it('step 2 fails: step 1 (the apt drop-in) is undone, the record removed, exit 3 with a clear error', () => {
    const root = stagingRoot();
    mkdirSync(join(root, 'etc/systemd/system'), { recursive: true });
    const before = tree(root);
    const script = `mount --bind "$1/etc/systemd" "$1/etc/systemd" && mount -o remount,bind,ro "$1/etc/systemd" && exec "$2" --import tsx "$3" tor enable --root "$1"`;
    const run = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, 'sh', root, process.execPath, CLI], {
      encoding: 'utf8',
      timeout: 60_000,
    });
    expect(run.stderr).toMatch(/read-only file system/i);
    expect(run.stderr).toContain('every file written before it was put back as it was');
    expect(run.status).toBe(3);
    expect(tree(root, stateFree)).toEqual(before);
    expect(existsSync(join(root, 'var/lib/egressd', TOR_RECORD_FILE))).toBe(false);
  });
});
