import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';

/**
 * A minimal Debian 12 tree for booting a real systemd (test/boot/nspawn.ts),
 * made with debootstrap once and kept outside the checkout. Its folder is
 * named by a digest of what it contains (suite, variant, packages, this
 * recipe's version), so a changed recipe builds a new one beside the old and
 * an unchanged one is never rebuilt. Tests boot it through an overlay and
 * never write into it.
 */
export const CACHE_DIR = process.env.EGRESSD_TEST_CACHE ?? '/var/cache/egressd-test';
export const MIRROR = process.env.EGRESSD_TEST_MIRROR ?? 'http://deb.debian.org/debian';

const RECIPE = {
  version: 1,
  suite: 'bookworm',
  variant: 'minbase',
  // What egressd needs of the system (systemd as PID 1, its bus, nftables and the
  // libraries koffi opens), and netbase: nft reads protocol names from /etc/protocols,
  // which every Debian system but a minbase one has.
  packages: ['systemd', 'systemd-sysv', 'dbus', 'nftables', 'libnftables1', 'libnftnl11', 'libmnl0', 'libsystemd0', 'netbase', 'iproute2'],
} as const;

export interface Image {
  /** The root of the tree. */
  readonly root: string;
  /** Seconds debootstrap took, when it ran now; undefined when the tree was cached. */
  readonly builtIn?: number;
}

export function imageKey(): string {
  return createHash('sha256').update(JSON.stringify(RECIPE)).digest('hex').slice(0, 16);
}

function imageDir(): string {
  return join(CACHE_DIR, `debian12-${imageKey()}`);
}

export function cachedImage(): string | undefined {
  const dir = imageDir();
  return existsSync(join(dir, 'complete')) ? join(dir, 'root') : undefined;
}

/**
 * The cached tree, or a new one (debootstrap, about half a minute with a near
 * mirror). Built into a temporary folder and renamed when complete, under a
 * lock, so that a run killed half-way or two runs at once leave no half tree.
 */
export function ensureImage(): Image {
  const dir = imageDir();
  const cached = cachedImage();
  if (cached) return { root: cached };
  mkdirSync(CACHE_DIR, { recursive: true });
  const building = `${dir}.building`;
  const started = process.hrtime.bigint();
  const script = [
    'set -e',
    `[ -e "${dir}/complete" ] && exit 0`,
    `rm -rf "${building}"`,
    `mkdir -p "${building}"`,
    `debootstrap --variant=${RECIPE.variant} --include=${RECIPE.packages.join(',')} ${RECIPE.suite} "${building}/root" "${MIRROR}" >"${building}/debootstrap.log" 2>&1 || { tail -20 "${building}/debootstrap.log" >&2; exit 1; }`,
    `[ -x "${building}/root/usr/lib/systemd/systemd" ] || { echo "debootstrap made no systemd" >&2; exit 1; }`,
    `printf '%s\\n' '${JSON.stringify(RECIPE)}' >"${building}/recipe.json"`,
    `: >"${building}/complete"`,
    `rm -rf "${dir}"`,
    `mv "${building}" "${dir}"`,
  ].join('\n');
  const run = spawnSync('flock', [join(CACHE_DIR, '.lock'), 'sh', '-c', script], { encoding: 'utf8', timeout: 900_000 });
  if (run.status !== 0) {
    rmSync(building, { recursive: true, force: true });
    throw new Error(`debootstrap of Debian 12 from ${MIRROR} failed:\n${run.stderr}`);
  }
  return { root: join(dir, 'root'), builtIn: Number(process.hrtime.bigint() - started) / 1e9 };
}
