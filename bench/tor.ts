/**
 * Updates over Tor, measured on the tests' private Tor network (issue 21):
 * the harness's "host" and "internet" namespaces, a directory authority, a
 * middle and an exit relay in the internet, the host's tor as debian-tor, a
 * signed apt repository on a mirror in the internet — nothing outside the
 * namespaces the bench makes (test/support/tor, test/harness).
 *
 *   (1) the network: from starting the three relays to a consensus listing
 *       them, and the RSS of all four tors;
 *   (2) from starting the host's tor to the first successful `apt-get
 *       update` through it, as `_apt`, under egressd's table with updates
 *       over Tor on (each round stops the host's tor and forgets apt's lists
 *       first): bootstrap, ready to exit, update done;
 *   (3) throughput of `apt-get download` of one large package: direct (as
 *       `_apt`, by address, before the table is applied) against over Tor.
 *
 * (2) starts from `egressctl tor enable` (enableUpdatesOverTor), as an installer switches it on.
 *
 *   npx tsx bench/tor.ts [--quick]   (as root; `npm run bench -- tor`)
 * --quick: 2 rounds and a 16 MiB package, under a minute; full: 5 rounds, 64 MiB.
 */
import { mkdirSync, readFileSync, rmSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { createTestNet, type TestNet } from '../test/harness/index.js';
import { APT_USER, makeAptRoot, type AptRoot } from '../test/support/tor/apt.js';
import { buildAptRepository, startMirror } from '../test/support/tor/mirror.js';
import { startTorNetwork, TOR_USER, type TorNetwork } from '../test/support/tor/network.js';
import { median } from './lib/stats.js';

const { values } = parseArgs({ options: { quick: { type: 'boolean' } } });
const quick = values.quick === true;
const ROUNDS = quick ? 2 : 5;
const BIG = (quick ? 16 : 64) * 1024 * 1024;
const MIRROR = '203.0.113.80';
const MIRROR_NAME = 'mirror.egressd.test';
const SOCKS = { host: '127.0.0.1', port: 9050 };
const CLI = join(import.meta.dirname, '..', 'src/cli/main.ts');

function table(head: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join(' | ')} |`;
  return [line(head), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...rows.map(line)].join('\n');
}

async function timed(what: string, run: () => Promise<{ code: number | null; stdout: string; stderr: string }>): Promise<number> {
  const started = performance.now();
  const result = await run();
  if (result.code !== 0) throw new Error(`${what} failed: ${result.stdout}${result.stderr}`);
  return performance.now() - started;
}

/**
 * Updates over Tor switched on as an installer does it: `egressctl tor enable` on a staging root shaped like
 * Debian's (its apt drop-in, its policy drop-in, the table applied to this namespace), then the system's Tor
 * starts. The bench's apt reads its own configuration root, so the drop-in enable wrote is copied there.
 */
async function enableUpdatesOverTor(
  net: TestNet,
  stage: string,
  tor: TorNetwork,
  apt: AptRoot,
): Promise<{ enableMs: number; bootstrapMs: number; exitReadyMs: number }> {
  const enableMs = await timed('egressctl tor enable', () =>
    net.host.node(CLI, ['tor', 'enable', '--root', stage, '--apply', '--updaters', 'apt', '--socks', `${SOCKS.host}:${SOCKS.port}`], {
      env: { ...process.env },
    }),
  );
  apt.setDropIn(readFileSync(join(stage, 'etc/apt/apt.conf.d/80egressd-tor'), 'utf8'));
  return { enableMs, ...(await tor.startClient()) };
}

/** A staging root with what `tor enable` reads of a Debian host, and a policy that denies by default with apt's identity. */
function debianLikeRoot(): string {
  const stage = mkdtempSync(join(tmpdir(), 'egd-bench-tor-root-'));
  const files: Record<string, string> = {
    'usr/bin/tor': '#!/bin/false\n',
    'etc/tor/torrc': '# nothing\n',
    'usr/share/tor/tor-service-defaults-torrc':
      'SocksPort 9050\nControlSocket /run/tor/control\nCookieAuthentication 1\nCookieAuthFile /run/tor/control.authcookie\n',
    'etc/apt/apt.conf.d/70debconf': 'DPkg::Pre-Install-Pkgs {"/usr/sbin/dpkg-preconfigure --apt || true";};\n',
    'etc/egressd/00-base.yaml': `defaults: {egress: deny}\nidentities:\n  apt: {user: ${APT_USER}}\ntor:\n  user: ${TOR_USER}\n`,
  };
  for (const [path, text] of Object.entries(files)) {
    mkdirSync(dirname(join(stage, path)), { recursive: true });
    writeFileSync(join(stage, path), text);
  }
  return stage;
}

async function main(): Promise<void> {
  let net: TestNet | undefined;
  let tor: TorNetwork | undefined;
  const cleanups: (() => unknown)[] = [];
  try {
    net = await createTestNet({ inetAddrs: [MIRROR] });
    const repo = buildAptRepository([
      { name: 'egd-hello', payloadBytes: 2048 },
      { name: 'egd-big', payloadBytes: BIG },
    ]);
    cleanups.push(() => repo.remove());
    const mirror = await startMirror(net, dirname(repo.dir), MIRROR);
    cleanups.push(() => mirror.stop());
    const big = repo.packages.find((pkg) => pkg.name === 'egd-big')!;

    // (3, direct) before the table: _apt straight to the mirror's address.
    const direct = makeAptRoot(net, { url: `http://${MIRROR}/debian`, keyFile: repo.keyFile });
    cleanups.push(() => direct.remove());
    await timed('direct apt-get update', () => direct.aptGet(['update', '--error-on=any']));
    const directMs: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      rmSync(join(direct.downloads, big.file), { force: true });
      directMs.push(await timed('direct apt-get download', () => direct.aptGet(['download', 'egd-big'], 300_000)));
    }

    const stage = debianLikeRoot();
    cleanups.push(() => rmSync(stage, { recursive: true, force: true }));

    // (1)
    tor = await startTorNetwork(net, { names: { [MIRROR_NAME]: MIRROR }, socksPort: SOCKS.port, probeAs: APT_USER });
    const network = tor.times;
    const rss = tor.rssKiB();

    // (2)
    const apt = makeAptRoot(net, { url: `http://${MIRROR_NAME}/debian`, keyFile: repo.keyFile });
    cleanups.push(() => apt.remove());
    const starts: { enableMs: number; bootstrapMs: number; exitReadyMs: number; updateMs: number }[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      await tor.stopClient();
      apt.forget();
      apt.setDropIn(undefined);
      if (round > 0)
        await timed('egressctl tor disable', () => net!.host.node(CLI, ['tor', 'disable', '--root', stage, '--apply'], { env: { ...process.env } }));
      const began = performance.now();
      const ready = await enableUpdatesOverTor(net, stage, tor, apt);
      await timed('apt-get update over Tor', () => apt.aptGet(['update', '--error-on=any']));
      starts.push({ ...ready, updateMs: performance.now() - began });
    }

    // (3, over Tor)
    const torMs: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      rmSync(join(apt.downloads, big.file), { force: true });
      torMs.push(await timed('apt-get download over Tor', () => apt.aptGet(['download', 'egd-big'], 300_000)));
    }

    const ms = (x: number) => `${Math.round(x)} ms`;
    const mibs = (durations: number[]) => `${(big.size / 1024 / 1024 / (median(durations) / 1000)).toFixed(1)} MiB/s`;
    console.log(`updates over Tor on the private network (${quick ? 'quick' : 'full'}: ${ROUNDS} rounds, medians)\n`);
    console.log(
      table(
        ['scenario', 'result'],
        [
          ['relays started → consensus lists all three', ms(network.consensusMs)],
          ['RSS of the four tors', `${Math.round(rss / 1024)} MiB`],
          ['egressctl tor enable (files written, policy applied)', ms(median(starts.map((s) => s.enableMs)))],
          ["host's tor started → bootstrapped 100 % with a circuit", ms(median(starts.map((s) => s.bootstrapMs)))],
          ["host's tor started → a name resolved at the exit", ms(median(starts.map((s) => s.exitReadyMs)))],
          ['egressctl tor enable → first apt-get update done (Tor started after it; as _apt, under egressd)', ms(median(starts.map((s) => s.updateMs)))],
          [`apt-get download ${Math.round(big.size / 1024 / 1024)} MiB, direct`, `${ms(median(directMs))} (${mibs(directMs)})`],
          [`apt-get download ${Math.round(big.size / 1024 / 1024)} MiB, over Tor`, `${ms(median(torMs))} (${mibs(torMs)})`],
          ['Tor / direct download time', `${(median(torMs) / median(directMs)).toFixed(1)} ×`],
        ],
      ),
    );
  } finally {
    await tor?.stop();
    for (const cleanup of cleanups.reverse()) await cleanup();
    await net?.destroy();
  }
}

await main();
