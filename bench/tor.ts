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
 * When `egressctl tor enable` lands, (2) starts from it (startUpdatesOverTor).
 *
 *   npx tsx bench/tor.ts [--quick]   (as root; `npm run bench -- tor`)
 * --quick: 2 rounds and a 16 MiB package, under a minute; full: 5 rounds, 64 MiB.
 */
import { rmSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { createTestNet, type TestNet } from '../test/harness/index.js';
import { aptTorDropIn, APT_USER, makeAptRoot, type AptRoot } from '../test/support/tor/apt.js';
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

/** What switches updates over Tor on, from nothing running: today the host's tor and apt's drop-in; later `egressctl tor enable`. */
async function startUpdatesOverTor(tor: TorNetwork, apt: AptRoot): Promise<{ bootstrapMs: number; exitReadyMs: number }> {
  apt.setDropIn(aptTorDropIn(SOCKS, 'apt'));
  return tor.startClient();
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

    const state = mkdtempSync(join(tmpdir(), 'egd-bench-tor-'));
    const policy = mkdtempSync(join(tmpdir(), 'egd-bench-tor-policy-'));
    cleanups.push(
      () => rmSync(state, { recursive: true, force: true }),
      () => rmSync(policy, { recursive: true, force: true }),
    );
    writeFileSync(
      join(policy, '00.yaml'),
      `defaults: {egress: deny}\nidentities:\n  apt: {user: ${APT_USER}}\ntor:\n  enabled: true\n  socks: "${SOCKS.host}:${SOCKS.port}"\n  user: ${TOR_USER}\n  updaters: [apt]\n`,
    );
    const applied = await net.host.node(CLI, ['apply', policy], { env: { ...process.env, EGRESSD_STATE_DIR: state } });
    if (applied.code !== 0) throw new Error(`egressctl apply: ${applied.stderr}`);

    // (1)
    tor = await startTorNetwork(net, { names: { [MIRROR_NAME]: MIRROR }, socksPort: SOCKS.port });
    const network = tor.times;
    const rss = tor.rssKiB();

    // (2)
    const apt = makeAptRoot(net, { url: `http://${MIRROR_NAME}/debian`, keyFile: repo.keyFile });
    cleanups.push(() => apt.remove());
    const starts: { bootstrapMs: number; exitReadyMs: number; updateMs: number }[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      await tor.stopClient();
      apt.forget();
      const began = performance.now();
      const ready = await startUpdatesOverTor(tor, apt);
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
          ["host's tor started → bootstrapped 100 % with a circuit", ms(median(starts.map((s) => s.bootstrapMs)))],
          ["host's tor started → a name resolved at the exit", ms(median(starts.map((s) => s.exitReadyMs)))],
          ["host's tor started → first apt-get update done (as _apt, under egressd)", ms(median(starts.map((s) => s.updateMs)))],
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
