import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestNet } from '../../harness/index.js';
import { printed } from '../wait.js';

/**
 * A local apt repository, flat ("deb URL ./"), of .deb packages built here
 * with dpkg-deb, signed with a key made here (gpg, a throwaway GNUPGHOME), and
 * a mirror that serves it over HTTP in the "internet" namespace and logs who
 * asked for what.
 */

export interface PackageSpec {
  readonly name: string;
  /** Bytes of incompressible payload (the package is built without compression). */
  readonly payloadBytes: number;
}

export interface AptRepository {
  /** The repository: InRelease, Release, Packages, *.deb; served as /debian (serve its parent). */
  readonly dir: string;
  /** The signing key, an OpenPGP keyring apt's Signed-By takes. */
  readonly keyFile: string;
  readonly packages: readonly { name: string; version: string; file: string; size: number }[];
  remove(): void;
}

function run(argv: readonly string[], options: { input?: string; env?: NodeJS.ProcessEnv } = {}): string {
  const [cmd = '', ...args] = argv;
  const result = spawnSync(cmd, args, { input: options.input ?? '', encoding: 'utf8', timeout: 60_000, env: options.env ?? process.env });
  if (result.status !== 0) throw new Error(`${argv.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr}${result.stdout}`);
  return result.stdout;
}

const hashOf = (algorithm: string, data: Buffer) => createHash(algorithm).update(data).digest('hex');

export function buildAptRepository(packages: readonly PackageSpec[]): AptRepository {
  const top = mkdtempSync(join(tmpdir(), 'egd-repo-'));
  chmodSync(top, 0o755);
  const dir = join(top, 'debian');
  const build = join(top, 'build');
  const gnupg = join(top, 'gnupg');
  mkdirSync(dir, { mode: 0o755 });
  mkdirSync(gnupg, { mode: 0o700 });
  const version = '1.0';
  const stanzas: string[] = [];
  const built = packages.map((spec) => {
    const tree = join(build, spec.name);
    mkdirSync(join(tree, 'DEBIAN'), { recursive: true });
    mkdirSync(join(tree, 'usr/share/egressd-test'), { recursive: true });
    writeFileSync(join(tree, 'usr/share/egressd-test', spec.name), randomBytes(spec.payloadBytes));
    const control = [
      `Package: ${spec.name}`,
      `Version: ${version}`,
      'Architecture: all',
      'Maintainer: egressd tests <tests@egressd.test>',
      `Installed-Size: ${Math.ceil(spec.payloadBytes / 1024)}`,
      'Section: misc',
      'Priority: optional',
      `Description: egressd test package ${spec.name}`,
      ' Fetched over a private Tor network by the updates-over-Tor tests.',
    ];
    writeFileSync(join(tree, 'DEBIAN/control'), `${control.join('\n')}\n`);
    const file = `${spec.name}_${version}_all.deb`;
    run(['dpkg-deb', '--root-owner-group', '-Znone', '--build', tree, join(dir, file)]);
    const deb = readFileSync(join(dir, file));
    stanzas.push(
      [
        ...control.slice(0, -2),
        `Filename: ./${file}`,
        `Size: ${deb.length}`,
        `MD5sum: ${hashOf('md5', deb)}`,
        `SHA256: ${hashOf('sha256', deb)}`,
        ...control.slice(-2),
      ].join('\n'),
    );
    return { name: spec.name, version, file, size: deb.length };
  });
  const index = Buffer.from(`${stanzas.join('\n\n')}\n`);
  writeFileSync(join(dir, 'Packages'), index);
  // A Date a minute back: apt refuses a Release from the future.
  const release = [
    'Origin: egressd-test',
    'Label: egressd-test',
    'Suite: test',
    'Codename: test',
    `Date: ${new Date(Date.now() - 60_000).toUTCString()}`,
    'Architectures: all',
    'MD5Sum:',
    ` ${hashOf('md5', index)} ${index.length} Packages`,
    'SHA256:',
    ` ${hashOf('sha256', index)} ${index.length} Packages`,
  ];
  writeFileSync(join(dir, 'Release'), `${release.join('\n')}\n`);

  const env = { ...process.env, GNUPGHOME: gnupg };
  try {
    run(['gpg', '--batch', '--passphrase', '', '--quick-gen-key', 'egressd test mirror <mirror@egressd.test>', 'ed25519', 'sign', 'never'], { env });
    run(['gpg', '--batch', '--yes', '--clearsign', '--output', join(dir, 'InRelease'), join(dir, 'Release')], { env });
    run(['gpg', '--batch', '--yes', '--output', join(top, 'mirror.gpg'), '--export'], { env });
  } finally {
    spawnSync('gpgconf', ['--kill', 'all'], { env, timeout: 10_000 });
    rmSync(gnupg, { recursive: true, force: true });
  }
  chmodSync(join(top, 'mirror.gpg'), 0o644);
  rmSync(build, { recursive: true, force: true });
  const remove = () => {
    rmSync(top, { recursive: true, force: true });
    process.off('exit', remove);
  };
  process.once('exit', remove);
  return { dir, keyFile: join(top, 'mirror.gpg'), packages: built, remove };
}

export interface Access {
  readonly peer: string;
  readonly method: string;
  readonly path: string;
  readonly status: number;
  readonly bytes: number;
  readonly time: number;
}

export interface Mirror {
  readonly address: string;
  readonly port: number;
  /** Every request so far. */
  accesses(): readonly Access[];
  stop(): Promise<void>;
}

/** Serves `dir` on address:port in the internet namespace (the address must be on its loopback). */
export async function startMirror(net: TestNet, dir: string, address: string, port = 80): Promise<Mirror> {
  const child: ChildProcess = net.inet.spawn(process.execPath, [join(import.meta.dirname, 'mirror-server.cjs'), dir, address, String(port)]);
  const log: Access[] = [];
  let buffered = '';
  child.stdout?.on('data', (chunk: Buffer) => {
    buffered += chunk.toString();
    for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
      const line = buffered.slice(0, at);
      buffered = buffered.slice(at + 1);
      const event = JSON.parse(line) as Access & { ev: string };
      if (event.ev === 'access') log.push(event);
    }
  });
  await printed(child, 'stdout', '"ev":"listening"', 10_000);
  return {
    address,
    port,
    accesses: () => [...log],
    async stop() {
      if (child.exitCode !== null) return;
      const gone = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGTERM');
      await gone;
    },
  };
}
