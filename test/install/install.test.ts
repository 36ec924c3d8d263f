import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  appendFileSync,
  cpSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  realpathSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

// scripts/install.sh --root into temp trees. It copies the build (dist/ and the
// production packages of node_modules), so it needs a built checkout.
const CHECKOUT = join(import.meta.dirname, '..', '..');
const SCRIPT = join(CHECKOUT, 'scripts', 'install.sh');
const temps: string[] = [];

function temp(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  temps.push(dir);
  return dir;
}

/** A copy of what install.sh reads from a checkout, so a test can change the shipped files as a new version would. */
function source(systemd: Record<string, string> = {}): string {
  const src = temp('egressd-src-');
  mkdirSync(join(src, 'scripts'));
  cpSync(SCRIPT, join(src, 'scripts', 'install.sh'));
  for (const part of ['dist', 'policies', 'package.json', 'package-lock.json', 'README.md']) cpSync(join(CHECKOUT, part), join(src, part), { recursive: true });
  symlinkSync(realpathSync(join(CHECKOUT, 'node_modules')), join(src, 'node_modules'));
  cpSync(join(CHECKOUT, 'systemd'), join(src, 'systemd'), { recursive: true });
  for (const [name, text] of Object.entries(systemd)) writeFileSync(join(src, 'systemd', name), text);
  return src;
}

interface Run {
  readonly code: number | null;
  readonly out: string;
  readonly err: string;
}

function install(src: string, ...args: string[]): Run {
  const r = spawnSync(join(src, 'scripts', 'install.sh'), args, { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** Every entry under dir: type, mode, mtime, and content checksum or link target. */
function snapshot(dir: string): Map<string, string> {
  const entries = new Map<string, string>();
  const walk = (rel: string): void => {
    for (const name of readdirSync(join(dir, rel))) {
      const path = join(rel, name);
      const st = lstatSync(join(dir, path));
      if (st.isSymbolicLink()) entries.set(path, `l ${readlinkSync(join(dir, path))}`);
      else if (st.isDirectory()) {
        entries.set(path, `d ${st.mode} ${st.mtimeMs}`);
        walk(path);
      } else
        entries.set(
          path,
          `f ${st.mode} ${st.mtimeMs} ${createHash('sha256')
            .update(readFileSync(join(dir, path)))
            .digest('hex')}`,
        );
    }
  };
  walk('');
  return entries;
}

const files = (dir: string): string[] => [...snapshot(dir).entries()].filter(([, v]) => !v.startsWith('d ')).map(([k]) => k);
const read = (...path: string[]): string => readFileSync(join(...path), 'utf8');
const node = (...args: string[]): Run => {
  const r = spawnSync(process.execPath, args, { encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
};

const unavailable =
  process.getuid?.() !== 0 ? 'install.sh runs as root' : !existsSync(join(CHECKOUT, 'dist', 'cli', 'main.js')) ? 'no build: run npm run build' : undefined;

describe.skipIf(unavailable)(`scripts/install.sh --root ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let src: string;
  beforeAll(() => {
    src = source();
  });
  afterAll(() => {
    for (const dir of temps) rmSync(dir, { recursive: true, force: true });
  });

  it('puts the build, its production packages, the policies and the commands in place, and they run', () => {
    const root = temp('egressd-root-');
    const r = install(src, '--root', root);
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    expect(r.out).toContain('the running system was not touched');

    const lib = join(root, 'usr/lib/egressd');
    expect(read(lib, 'dist/cli/main.js')).toBe(read(CHECKOUT, 'dist/cli/main.js'));
    expect(read(lib, 'package-lock.json')).toBe(read(CHECKOUT, 'package-lock.json'));
    const pkg = JSON.parse(read(CHECKOUT, 'package.json')) as { dependencies: Record<string, string>; devDependencies: Record<string, string> };
    for (const dep of Object.keys(pkg.dependencies)) expect(existsSync(join(lib, 'node_modules', dep, 'package.json')), dep).toBe(true);
    const lock = JSON.parse(read(CHECKOUT, 'package-lock.json')) as { packages: Record<string, { dev?: boolean }> };
    const devOnly = Object.keys(pkg.devDependencies).filter((dep) => lock.packages[`node_modules/${dep}`]?.dev === true);
    expect(devOnly).toContain('vitest');
    for (const dep of devOnly) expect(existsSync(join(lib, 'node_modules', dep)), dep).toBe(false);

    for (const file of files(join(CHECKOUT, 'policies'))) expect(read(root, 'etc/egressd', file), file).toBe(read(CHECKOUT, 'policies', file));
    expect(existsSync(join(root, 'etc/egressd/lists/LICENSE.blocklistproject'))).toBe(true);
    for (const unit of readdirSync(join(CHECKOUT, 'systemd')).filter((f) => f.endsWith('.service')))
      expect(read(root, 'usr/lib/systemd/system', unit)).toBe(read(CHECKOUT, 'systemd', unit));
    // egressd-early's script and fail-safe ruleset, where its ExecStart names them.
    expect(read(root, 'usr/lib/systemd/system/egressd-early.service')).toContain(
      '/usr/lib/egressd/egressd-early.sh /var/lib/egressd /usr/lib/egressd/egressd-failsafe.nft',
    );
    for (const file of ['egressd-early.sh', 'egressd-failsafe.nft']) expect(read(lib, file), file).toBe(read(CHECKOUT, 'systemd', file));

    expect(readlinkSync(join(root, 'usr/bin/egressctl'))).toBe('../lib/egressd/dist/cli/main.js');
    expect(readlinkSync(join(root, 'usr/sbin/egressd'))).toBe('../lib/egressd/dist/daemon/main.js');
    // Run through the links: node resolves the packages from the installed node_modules, nothing else.
    const help = spawnSync(join(root, 'usr/bin/egressctl'), ['--help'], { encoding: 'utf8' });
    expect(help.status).toBe(0);
    expect(help.stdout + help.stderr).toContain('Usage: egressctl');
    expect(spawnSync(join(root, 'usr/sbin/egressd'), ['--help'], { encoding: 'utf8' }).status).toBe(0);
    const check = spawnSync(join(root, 'usr/bin/egressctl'), ['check', join(root, 'etc/egressd')], { encoding: 'utf8' });
    expect(check.stderr).toMatch(/valid/);
    expect(check.status).toBe(0);
    // koffi is loaded lazily (sd_notify, set elements): its native part must be there too.
    const koffi = node('-e', 'require("module").createRequire(process.argv[1])("koffi")', join(lib, 'package.json'));
    expect(koffi.err).toBe('');
    expect(koffi.code).toBe(0);
  });

  it('a second install changes nothing and says so', () => {
    const root = temp('egressd-root-');
    expect(install(src, '--root', root).code).toBe(0);
    const before = snapshot(root);
    const again = install(src, '--root', root);
    expect(again.code).toBe(0);
    expect(again.out).toContain('nothing to change');
    expect(snapshot(root)).toEqual(before);
  });

  it('an upgrade updates what the admin left alone, keeps what they changed with the new version beside it, and drops what is no longer shipped', () => {
    const v1 = source();
    writeFileSync(join(v1, 'policies', '99-extra.yaml'), 'deny: []\n');
    const root = temp('egressd-root-');
    expect(install(v1, '--root', root).code).toBe(0);
    expect(existsSync(join(root, 'etc/egressd/99-extra.yaml'))).toBe(true);
    const admin = `${read(root, 'etc/egressd/30-apps.yaml')}# the admin's line\n`;
    writeFileSync(join(root, 'etc/egressd/30-apps.yaml'), admin);

    // Version 2 of the shipped files, in the same source tree.
    rmSync(join(v1, 'policies', '99-extra.yaml'));
    appendFileSync(join(v1, 'policies', '00-defaults.yaml'), '# v2\n');
    appendFileSync(join(v1, 'policies', '30-apps.yaml'), '# v2\n');
    appendFileSync(join(v1, 'dist', 'errors.js'), '// v2\n');
    const r = install(v1, '--root', root);
    expect(r.code).toBe(0);
    expect(read(root, 'etc/egressd/00-defaults.yaml')).toBe(read(v1, 'policies/00-defaults.yaml'));
    expect(read(root, 'etc/egressd/30-apps.yaml')).toBe(admin);
    expect(read(root, 'etc/egressd/30-apps.yaml.dist')).toBe(read(v1, 'policies/30-apps.yaml'));
    expect(r.out).toContain('kept /etc/egressd/30-apps.yaml: changed by an admin; the shipped version is /etc/egressd/30-apps.yaml.dist');
    expect(existsSync(join(root, 'etc/egressd/99-extra.yaml'))).toBe(false);
    expect(read(root, 'usr/lib/egressd/dist/errors.js')).toBe(read(v1, 'dist/errors.js'));
    expect(spawnSync(join(root, 'usr/bin/egressctl'), ['--help']).status).toBe(0);

    const before = snapshot(root);
    const again = install(v1, '--root', root);
    expect(again.out).toContain('nothing to change');
    expect(snapshot(root)).toEqual(before);

    // The admin takes the shipped version: the .dist goes, the file is the installer's again.
    writeFileSync(join(root, 'etc/egressd/30-apps.yaml'), read(v1, 'policies/30-apps.yaml'));
    expect(install(v1, '--root', root).code).toBe(0);
    expect(existsSync(join(root, 'etc/egressd/30-apps.yaml.dist'))).toBe(false);
    appendFileSync(join(v1, 'policies', '30-apps.yaml'), '# v3\n');
    expect(install(v1, '--root', root).code).toBe(0);
    expect(read(root, 'etc/egressd/30-apps.yaml')).toBe(read(v1, 'policies/30-apps.yaml'));
  });

  it('--uninstall leaves the tree as it was: empty after a plain install', () => {
    const root = temp('egressd-root-');
    expect(install(src, '--root', root).code).toBe(0);
    const r = install(src, '--root', root, '--uninstall');
    expect(r.code).toBe(0);
    expect(readdirSync(root)).toEqual([]);
    expect(install(src, '--root', root, '--uninstall').out).toContain('nothing to remove');
  });

  it('--uninstall keeps a policy file an admin changed and files it did not install', () => {
    const root = temp('egressd-root-');
    mkdirSync(join(root, 'usr/bin'), { recursive: true });
    writeFileSync(join(root, 'usr/bin/other'), 'not egressd\n');
    expect(install(src, '--root', root).code).toBe(0);
    appendFileSync(join(root, 'etc/egressd/40-system-domains.yaml'), '# mine\n');
    const r = install(src, '--root', root, '--uninstall');
    expect(r.code).toBe(0);
    expect(r.out).toContain('kept /etc/egressd/40-system-domains.yaml: changed by an admin');
    expect(files(root).sort()).toEqual(['etc/egressd/40-system-domains.yaml', 'usr/bin/other']);
    expect([...snapshot(root).keys()].sort()).toEqual(['etc', 'etc/egressd', 'etc/egressd/40-system-domains.yaml', 'usr', 'usr/bin', 'usr/bin/other']);
  });

  it('puts units, tmpfiles and sysusers snippets, a D-Bus policy and a ruleset a unit names where systemd reads them', () => {
    const routed = source({
      'egressd-early.service': '[Service]\nType=oneshot\nExecStart=/usr/sbin/nft -f /usr/lib/egressd/failsafe-test.nft\n',
      'failsafe-test.nft': 'table inet egressd {}\n',
      'other-test.nft': 'table inet egressd {}\n',
      'egressd-tmpfiles.conf': 'd /var/lib/egressd 0700 root root -\n',
      'egressd-sysusers.conf': 'g egressd-audit -\n',
      'org.egressd1.conf': '<busconfig/>\n',
    });
    const root = temp('egressd-root-');
    const r = install(routed, '--root', root);
    expect(r.code).toBe(0);
    expect(read(root, 'usr/lib/systemd/system/egressd-early.service')).toContain('failsafe-test.nft');
    expect(read(root, 'usr/lib/egressd/failsafe-test.nft')).toBe('table inet egressd {}\n');
    expect(existsSync(join(root, 'usr/lib/systemd/system/other-test.nft'))).toBe(true);
    expect(read(root, 'usr/lib/tmpfiles.d/egressd.conf')).toContain('/var/lib/egressd');
    expect(read(root, 'usr/lib/sysusers.d/egressd.conf')).toContain('egressd-audit');
    expect(existsSync(join(root, 'usr/share/dbus-1/system.d/org.egressd1.conf'))).toBe(true);
    const before = snapshot(root);
    expect(install(routed, '--root', root).out).toContain('nothing to change');
    expect(snapshot(root)).toEqual(before);
    expect(install(routed, '--root', root, '--uninstall').code).toBe(0);
    expect(readdirSync(root)).toEqual([]);
  });

  it('refuses to run as anyone but root, and touches nothing', () => {
    const root = temp('egressd-root-');
    // As root the test drops to nobody; the script comes on stdin, since nobody cannot read the temp source tree.
    const r = spawnSync('setpriv', ['--reuid=nobody', '--regid=nogroup', '--clear-groups', 'bash', '-s', '--', '--root', root], {
      input: readFileSync(SCRIPT),
      encoding: 'utf8',
    });
    expect(r.stderr).toContain('must run as root');
    expect(r.status).toBe(3);
    expect(readdirSync(root)).toEqual([]);
  });

  it('gives its usage on a bad argument (exit 2) and on --help (exit 0)', () => {
    const bad = install(src, '--bogus');
    expect(bad.code).toBe(2);
    expect(bad.err).toContain('unknown argument: --bogus');
    expect(bad.err).toContain('usage: scripts/install.sh [--root DIR] [--uninstall]');
    expect(install(src, '--root').code).toBe(2);
    expect(install(src, '--root', join(tmpdir(), 'egressd-no-such-dir')).code).toBe(2);
    const help = install(src, '--help');
    expect(help.code).toBe(0);
    expect(help.out).toContain('usage: scripts/install.sh');
  });
});
