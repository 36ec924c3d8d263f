import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { isIPv6 } from 'node:net';
import { join } from 'node:path';
import { aptDropInText } from '../../../src/tor/files.js';
import type { ExecResult, TestNet } from '../../harness/index.js';

/**
 * Real apt, with a root of its own: APT_CONFIG names a configuration that
 * points every apt directory (etc, state, cache, dpkg status) into a
 * temporary directory, so the host's apt configuration, lists and cache are
 * never read or touched. apt runs as root and drops to `_apt` for its
 * downloads itself, as on a real host; the directories it downloads into
 * belong to `_apt`, or apt would fetch as root (and say so).
 */

export const APT_USER = '_apt';

/**
 * THE apt drop-in that sends apt through Tor: exactly what `egressctl tor
 * enable` writes (src/tor/files.ts), so the end-to-end test proves what the
 * product writes. `_updater` is apt's: the writer names its own SOCKS users.
 */
export function aptTorDropIn(socks: { readonly host: string; readonly port: number }, _updater: string): string {
  return aptDropInText({ ...socks, family: isIPv6(socks.host) ? 6 : 4 });
}

export interface AptRoot {
  readonly root: string;
  /** What APT_CONFIG names. */
  readonly config: string;
  /** Where `apt-get download` puts packages (owned by _apt). */
  readonly downloads: string;
  /** Writes (or, with undefined, removes) the drop-in in this root's apt.conf.d. */
  setDropIn(text: string | undefined): void;
  /** Runs apt-get with this root's configuration on the host, as root (apt drops to _apt itself). */
  aptGet(args: readonly string[], timeoutMs?: number): Promise<ExecResult>;
  /** Forgets downloaded lists and packages (so the next update fetches everything again). */
  forget(): void;
  remove(): void;
}

export function makeAptRoot(net: TestNet, source: { url: string; keyFile: string }): AptRoot {
  const root = mkdtempSync(join(tmpdir(), 'egd-apt-'));
  chmodSync(root, 0o755);
  const aptUid = uidOf(APT_USER);
  const owned = (path: string) => {
    mkdirSync(path, { recursive: true, mode: 0o755 });
    chownSync(path, aptUid, 65534);
  };
  for (const dir of ['etc/apt/apt.conf.d', 'etc/apt/sources.list.d', 'etc/apt/preferences.d', 'etc/apt/trusted.gpg.d', 'var/lib/dpkg', 'var/cache/apt'])
    mkdirSync(join(root, dir), { recursive: true, mode: 0o755 });
  const lists = join(root, 'var/lib/apt/lists');
  const archives = join(root, 'var/cache/apt/archives');
  const downloads = join(root, 'downloads');
  const reset = () => {
    for (const dir of [lists, archives, downloads]) rmSync(dir, { recursive: true, force: true });
    for (const dir of [lists, join(lists, 'partial'), archives, join(archives, 'partial'), downloads]) owned(dir);
  };
  reset();
  writeFileSync(join(root, 'var/lib/dpkg/status'), '');
  writeFileSync(join(root, 'etc/apt/sources.list.d/mirror.sources'), `Types: deb\nURIs: ${source.url}\nSuites: ./\nSigned-By: ${source.keyFile}\n`);
  const config = join(root, 'apt.conf');
  writeFileSync(
    config,
    [
      `Dir "${root}/";`,
      'Dir::Etc "etc/apt/";',
      'Dir::State "var/lib/apt/";',
      'Dir::Cache "var/cache/apt/";',
      `Dir::State::status "${root}/var/lib/dpkg/status";`,
      'Dir::Log "var/log/apt/";',
      'APT::Sandbox::User "_apt";',
      'Acquire::Languages "none";',
      'Acquire::Retries "0";',
      'Acquire::http::Timeout "20";',
      'Acquire::PDiffs "false";',
      '',
    ].join('\n'),
  );
  const dropIn = join(root, 'etc/apt/apt.conf.d/90egressd-tor');
  const remove = () => {
    rmSync(root, { recursive: true, force: true });
    process.off('exit', remove);
  };
  process.once('exit', remove);
  return {
    root,
    config,
    downloads,
    setDropIn(text) {
      if (text === undefined) rmSync(dropIn, { force: true });
      else writeFileSync(dropIn, text, { mode: 0o644 });
    },
    aptGet(args, timeoutMs = 60_000) {
      return net.host.exec('apt-get', ['-q', ...args], { env: { ...process.env, APT_CONFIG: config, LC_ALL: 'C' }, cwd: downloads, timeoutMs });
    },
    forget: reset,
    remove,
  };
}

/** The uid of a user, through NSS (getent), which may hold it anywhere. */
function uidOf(user: string): number {
  const uid = Number(spawnSync('getent', ['passwd', user], { encoding: 'utf8' }).stdout.split(':')[2]);
  if (!Number.isInteger(uid)) throw new Error(`user ${user} does not exist (the apt package makes it)`);
  return uid;
}
