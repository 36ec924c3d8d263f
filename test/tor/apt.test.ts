import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { parseLogPrefix } from '../../src/compile/log-prefix.js';
import { readRuleTable } from '../../src/state/rule-table.js';
import { getTorInfo } from '../../src/tor/control.js';
import { createTestNet, harnessUnavailableReason, type Server, type TestNet } from '../harness/index.js';
import { nflogPrefixes } from '../support/nflog.js';
import { policyDir } from '../support/policy-dir.js';
import { APT_USER, aptTorDropIn, makeAptRoot, type AptRoot } from '../support/tor/apt.js';
import { startCapture, type Capture, type Packet } from '../support/tor/capture.js';
import { buildAptRepository, startMirror, type AptRepository, type Mirror } from '../support/tor/mirror.js';
import { TOR_USER, startTorNetwork, torUnavailableReason, type TorNetwork } from '../support/tor/network.js';
import { until } from '../support/wait.js';

/**
 * Issue 21, end to end: real apt, as `_apt`, fetching a signed repository
 * through a private Tor network, with egressd's table in force on the host
 * from a policy with updates over Tor on. What leaves the host is read on the
 * internet side (tcpdump on its end of the link): Tor's own packets go to the
 * relays' ORPort, anything else from the host is a leak. The mirror's access
 * log says who fetched: the exit, never the host.
 */
const ROOT = join(import.meta.dirname, '..', '..');
const CLI = join(ROOT, 'src/cli/main.ts');
const missing = ['/usr/bin/apt-get', '/usr/bin/dpkg-deb', '/usr/bin/gpg', '/usr/bin/tcpdump', '/usr/bin/dig'].find((tool) => !existsSync(tool));
const unavailable = harnessUnavailableReason() ?? torUnavailableReason() ?? (missing && `${missing} is not installed`);

const MIRROR = '203.0.113.80';
const MIRROR_NAME = 'mirror.egressd.test';
const GROUP = 7821;
const SOCKS = { host: '127.0.0.1', port: 9050 };
const CONTROL_PORT = 9051;
const HOST = ['192.0.2.1', '2001:db8::1'];

describe.skipIf(unavailable)(`updates over Tor, end to end ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let tor: TorNetwork;
  let repo: AptRepository;
  let mirror: Mirror;
  let apt: AptRoot;
  let state: string;
  let dir: string;
  let loopbackService: Server;
  const env = () => ({ ...process.env, EGRESSD_STATE_DIR: state });
  const egressctl = async (...args: string[]) => {
    const result = await net.host.node(CLI, args, { env: env() });
    if (result.code !== 0) throw new Error(`egressctl ${args.join(' ')}: ${result.stderr}`);
    return result;
  };
  /** Packets from the host to anything but a relay's ORPort: not Tor's own, so a leak. */
  const leaks = (packets: readonly Packet[]) =>
    packets.filter((packet) => HOST.includes(packet.src) && !(tor.relayAddresses.includes(packet.dst) && packet.dport === 5000));
  const fromHost = (packets: readonly Packet[]) => packets.filter((packet) => HOST.includes(packet.src));
  /** The internet side's end of the link, IP only, without IPv6 neighbour discovery. */
  const captureInternet = () => startCapture(net.inet, net.inet.ifname, ['(ip or ip6) and not (icmp6 and ip6[40] >= 133 and ip6[40] <= 137)']);
  /** Runs `act` with egressd's NFLOG group and the internet side captured; both captures end whatever happens. */
  async function captured<T>(act: (nflog: Capture) => Promise<T>): Promise<{ result: T; nflog: Buffer; packets: Packet[] }> {
    const log = await startCapture(net.host, `nflog:${GROUP}`);
    let internet: Capture | undefined;
    try {
      internet = await captureInternet();
      const result = await act(log);
      return { result, nflog: (await log.stop()).pcap, packets: (await internet.stop()).packets };
    } finally {
      await log.stop();
      await internet?.stop();
    }
  }
  const sha256 = (path: string) => createHash('sha256').update(readFileSync(path)).digest('hex');

  beforeAll(async () => {
    net = await createTestNet({ inetAddrs: [MIRROR] });
    state = mkdtempSync(join(tmpdir(), 'egd-tor-state-'));
    repo = buildAptRepository([
      { name: 'egd-hello', payloadBytes: 2048 },
      { name: 'egd-world', payloadBytes: 64 * 1024 },
    ]);
    mirror = await startMirror(net, dirname(repo.dir), MIRROR);
    dir = policyDir(
      {
        '00.yaml': `
defaults: {egress: deny, log: {denials: true, group: ${GROUP}}}
identities:
  apt: {user: ${APT_USER}}
tor:
  enabled: true
  socks: "${SOCKS.host}:${SOCKS.port}"
  user: ${TOR_USER}
  updaters: [apt]
`,
      },
      { keep: true },
    );
    // The table first: the host's tor bootstraps under it, as on a host where egressd starts early.
    await egressctl('apply', dir);
    tor = await startTorNetwork(net, { names: { [MIRROR_NAME]: MIRROR }, socksPort: SOCKS.port, controlPort: CONTROL_PORT, probeAs: APT_USER });
    apt = makeAptRoot(net, { url: `http://${MIRROR_NAME}/debian`, keyFile: repo.keyFile });
    apt.setDropIn(aptTorDropIn(SOCKS, 'apt'));
    loopbackService = await net.host.listen({ proto: 'tcp', addr: '127.0.0.1', port: 0 });
  }, 120_000);

  afterAll(async () => {
    await loopbackService?.close().catch(() => {});
    await tor?.stop();
    await mirror?.stop();
    await net?.destroy();
    repo?.remove();
    apt?.remove();
    for (const path of [state, dir]) if (path) rmSync(path, { recursive: true, force: true });
  });

  it('apt-get update and download, as _apt through Tor, fetch the signed repository; the mirror sees only the exit, and the host sent only Tor', async () => {
    const capture = await captureInternet();
    const update = await apt.aptGet(['update', '--error-on=any']);
    const download = await apt.aptGet(['download', 'egd-hello', 'egd-world']);
    const { packets } = await capture.stop();
    expect(update.code, update.stdout + update.stderr).toBe(0);
    expect(update.stdout).toContain(`http://${MIRROR_NAME}/debian ./ InRelease`);
    // Fetched as _apt, not as root: apt says when it cannot drop privileges.
    expect(update.stderr + download.stderr).not.toMatch(/unsandboxed|W: /);
    expect(download.code, download.stdout + download.stderr).toBe(0);
    for (const pkg of repo.packages) expect(sha256(join(apt.downloads, pkg.file))).toBe(sha256(join(repo.dir, pkg.file)));

    const peers = new Set(mirror.accesses().map((access) => access.peer));
    expect([...peers]).toEqual([tor.exit.address]);
    expect(mirror.accesses().map((access) => access.path)).toEqual(expect.arrayContaining(['/debian/InRelease', `/debian/${repo.packages[0]?.file}`]));
    expect(leaks(packets)).toEqual([]);
    expect(fromHost(packets).length, "Tor's own packets to the relays were seen").toBeGreaterThan(0);
    // apt's SOCKS credentials reached Tor, which keeps its streams on circuits of apt's own.
    const circuits = await getTorInfo({ socket: tor.client.control.socket, cookieFile: tor.client.control.cookieFile }, ['circuit-status']);
    // The user name apt-get sends, as the drop-in gives it (apt-get's own Binary:: scope first, where the writer has one).
    const dropIn = aptTorDropIn(SOCKS, 'apt');
    const user = (/^Binary::apt-get::Acquire::http::Proxy "socks5h:\/\/([^:@"]+)/m.exec(dropIn) ??
      /^Acquire::http::Proxy "socks5h:\/\/([^:@"]+)/m.exec(dropIn))?.[1];
    expect(user).toBeDefined();
    expect(circuits.ok && circuits.values.get('circuit-status')).toContain(`SOCKS_USERNAME="${decodeURIComponent(user ?? '')}"`);
  });

  it("the attacker's view: as _apt, no DNS, no direct connection, no other loopback service, no control port, no relay — dropped, logged with the updaters' rule, never seen outside", async () => {
    const before = mirror.accesses().length;
    const as = { user: APT_USER, timeoutMs: 800 };
    // Root may reach the control port (a positive control: it listens), _apt may not.
    expect(await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: CONTROL_PORT, timeoutMs: 3000 })).toMatchObject({ connected: true });
    const {
      result: attempts,
      nflog,
      packets,
    } = await captured(async (log) => {
      const tried = {
        dnsAtExit: await net.host.connect({ proto: 'udp', addr: tor.dnsAddress, port: 53, ...as }),
        dig: await net.host.exec('dig', [`@${tor.dnsAddress}`, '+tries=1', '+time=1', MIRROR_NAME], { user: APT_USER, timeoutMs: 5000 }),
        mirror: await net.host.connect({ proto: 'tcp', addr: MIRROR, port: 80, ...as }),
        relay: await net.host.connect({ proto: 'tcp', addr: tor.exit.address, port: 5000, ...as }),
        loopback: await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: loopbackService.port, ...as }),
        control: await net.host.connect({ proto: 'tcp', addr: '127.0.0.1', port: CONTROL_PORT, ...as }),
      };
      await until('six NFLOG records', () => nflogPrefixes(log.pcap()).length >= 6, { timeoutMs: 5000 });
      return tried;
    });
    expect(attempts.dnsAtExit.ok).toBe(false);
    expect(attempts.dig.stdout + attempts.dig.stderr).toMatch(/timed out|no servers could be reached/);
    for (const name of ['mirror', 'relay', 'loopback', 'control'] as const)
      expect(attempts[name], name).toMatchObject({ connected: false, error: 'ETIMEDOUT' });
    expect(await loopbackService.count()).toBe(0);
    expect(mirror.accesses().length).toBe(before);
    expect(leaks(packets)).toEqual([]);
    // Every drop carries the short id of the updaters' deny rule.
    const rules = readRuleTable(state);
    if (rules.state !== 'ok') throw new Error(`rules.json: ${rules.state}`);
    const ruleIds = new Set(nflogPrefixes(nflog).map((prefix) => rules.value.byId.get(parseLogPrefix(prefix) ?? '')?.ruleId));
    expect([...ruleIds]).toEqual(['tor/updaters']);
  });

  it('lockdown keeps Tor, its bootstrap from scratch and updates over Tor working, while everyone else is cut off', async () => {
    await egressctl('lockdown', 'on', dir);
    try {
      expect(await net.host.connect({ proto: 'tcp', addr: MIRROR, port: 80, timeoutMs: 800 }), 'root, direct, under lockdown').toMatchObject({
        connected: false,
      });
      // A fresh start makes new connections to the relays: Tor's own traffic passes lockdown.
      await tor.stopClient();
      await tor.startClient();
      apt.forget();
      const before = mirror.accesses().length;
      const update = await apt.aptGet(['update', '--error-on=any']);
      expect(update.code, update.stdout + update.stderr).toBe(0);
      const download = await apt.aptGet(['download', 'egd-hello']);
      expect(download.code, download.stdout + download.stderr).toBe(0);
      expect(
        new Set(
          mirror
            .accesses()
            .slice(before)
            .map((access) => access.peer),
        ),
      ).toEqual(new Set([tor.exit.address]));
    } finally {
      await egressctl('lockdown', 'off', dir);
    }
  });

  it('Tor stopped: apt-get update fails with a clear error and nothing leaves the host, even with apt sent direct', async () => {
    await tor.stopClient();
    try {
      apt.forget();
      const before = mirror.accesses().length;
      const { result, nflog, packets } = await captured(async (log) => {
        const update = await apt.aptGet(['update', '--error-on=any']);
        // apt told to go direct (its drop-in gone: a person undid it, or it was never written), by name and by address.
        apt.setDropIn(undefined);
        try {
          const direct = await apt.aptGet(['update', '--error-on=any', '-o', 'Acquire::http::Timeout=3']);
          const sources = join(apt.root, 'direct.list');
          writeFileSync(sources, `deb [signed-by=${repo.keyFile}] http://${MIRROR}/debian ./\n`);
          const byAddress = await apt.aptGet([
            'update',
            '--error-on=any',
            '-o',
            'Acquire::http::Timeout=3',
            '-o',
            `Dir::Etc::SourceList=${sources}`,
            '-o',
            `Dir::Etc::SourceParts=${apt.root}/none`,
          ]);
          await until('the direct attempts logged', () => nflogPrefixes(log.pcap()).length >= 1, { timeoutMs: 5000 });
          return { update, direct, byAddress };
        } finally {
          apt.setDropIn(aptTorDropIn(SOCKS, 'apt'));
        }
      });
      const { update, direct, byAddress } = result;

      expect(update.code).not.toBe(0);
      expect(update.stdout + update.stderr).toContain('Could not connect to 127.0.0.1:9050 (127.0.0.1). - connect (111: Connection refused)');
      expect(direct.code).not.toBe(0);
      // Its DNS query dropped: the name resolves nowhere but at the exit anyway.
      expect(direct.stdout + direct.stderr).toContain(`Temporary failure resolving '${MIRROR_NAME}'`);
      expect(byAddress.code).not.toBe(0);
      expect(byAddress.stdout + byAddress.stderr).toContain(`Could not connect to ${MIRROR}:80 (${MIRROR}), connection timed out`);
      expect(mirror.accesses().length).toBe(before);
      // Not a packet from the host but to the relays' ORPort: the kernel's resets answering what
      // the relays still sent to the sockets of the tor that just stopped. Nothing to the mirror, no DNS.
      expect(leaks(packets)).toEqual([]);
      expect(
        fromHost(packets).filter((packet) => !packet.text.includes('Flags [R')),
        'no connection opened from the host',
      ).toEqual([]);
      const rules = readRuleTable(state);
      if (rules.state !== 'ok') throw new Error(`rules.json: ${rules.state}`);
      expect(new Set(nflogPrefixes(nflog).map((prefix) => rules.value.byId.get(parseLogPrefix(prefix) ?? '')?.ruleId))).toEqual(new Set(['tor/updaters']));
    } finally {
      await tor.startClient();
    }
    // And back: the same update works again once Tor is.
    apt.forget();
    const again = await apt.aptGet(['update', '--error-on=any']);
    expect(again.code, again.stdout + again.stderr).toBe(0);
  });
});
