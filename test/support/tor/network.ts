import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readTorStatus } from '../../../src/tor/control.js';
import type { TorStatus } from '../../../src/tor/status.js';
import type { TestNet } from '../../harness/index.js';
import { dnsmasqOnly } from '../dnsmasq.js';
import { until } from '../wait.js';

/**
 * A private Tor network with no internet, in the harness's two namespaces:
 * a directory authority (keys from tor-gencert), a middle and an exit relay
 * in the "internet", each on an address of its own, and the host's client on
 * the host as the system's tor would run — as Tor's user, SOCKS and control
 * on loopback. The exit reaches only the addresses it is given and resolves
 * names through a DNS server of its own (dnsmasq), the only place the test's
 * names resolve. All `TestingTorNetwork 1`; the templates are in
 * test/fixtures/tor. Every tor runs as Tor's user with a DataDirectory of
 * mode 0700 that it owns, as tor demands.
 *
 *   const tor = await startTorNetwork(net, { names: { 'mirror.test': '203.0.113.80' } });
 *   …
 *   await tor.stop();   // afterAll: every process, the temporary directory
 */

const TEMPLATES = join(import.meta.dirname, '..', '..', 'fixtures', 'tor');
export const TOR_USER = 'debian-tor';
const OR_PORT = 5000;
const DIR_PORT = 7000;

export interface Relay {
  readonly nick: string;
  readonly address: string;
  readonly dir: string;
  readonly process: ChildProcess;
}

export interface TorClient {
  readonly dir: string;
  readonly socks: { readonly host: string; readonly port: number };
  readonly control: { readonly host: string; readonly port: number; readonly socket: string; readonly cookieFile: string };
}

export interface ClientTimes {
  /** From the client's start to bootstrap 100 % with a circuit. */
  readonly bootstrapMs: number;
  /** … to the first name resolved at the exit through a circuit (SOCKS RESOLVE): ready for updates. */
  readonly exitReadyMs: number;
}

export interface TorNetworkTimes {
  /** From the relays' start to a consensus that lists all three. */
  readonly consensusMs: number;
  readonly client: ClientTimes;
}

export interface TorNetwork {
  readonly root: string;
  readonly authority: Relay;
  readonly middle: Relay;
  readonly exit: Relay;
  /** The relays' addresses: what Tor's own traffic from the host goes to. */
  readonly relayAddresses: readonly string[];
  /** The exit's DNS server (in the internet, answering the test's names). */
  readonly dnsAddress: string;
  readonly client: TorClient;
  readonly times: TorNetworkTimes;
  /** Whether the client runs. */
  readonly clientRunning: boolean;
  /** Stops the host's tor (SIGTERM, then waits for it to go); `crash`: SIGKILL, leaving its control socket and pid file behind. */
  stopClient(options?: { crash?: boolean }): Promise<void>;
  /** Starts it again and waits until it is ready to exit; returns how long that took. */
  startClient(): Promise<ClientTimes>;
  /** The client's status through its control socket. */
  clientStatus(): Promise<TorStatus>;
  /** Resident memory of every tor of the network, in KiB. */
  rssKiB(): number;
  /** Stops every process and removes the temporary directory. Idempotent. */
  stop(): Promise<void>;
}

export interface TorNetworkOptions {
  /** name → address: what the exit's DNS answers; the exit may reach these addresses (any port). */
  readonly names: Readonly<Record<string, string>>;
  /** Loopback ports of the host's tor (default 9050 and 9051). */
  readonly socksPort?: number;
  readonly controlPort?: number;
  /** Internet-side addresses for the authority, middle, exit and the exit's DNS (documentation range). */
  readonly addresses?: { authority: string; middle: string; exit: string; dns: string };
  /**
   * Who asks the readiness probe (a SOCKS resolve) of the host's tor; default root. Under egressd's table Tor's SOCKS port
   * is network for all but the updaters: where the policy's default denies, name an updater.
   */
  readonly probeAs?: string;
}

/** Why this machine cannot run the network, or undefined. */
export function torUnavailableReason(): string | undefined {
  for (const tool of ['/usr/sbin/tor', '/usr/bin/tor-gencert', '/usr/sbin/dnsmasq'])
    if (!existsSync(tool)) return `${tool} is not installed (scripts/setup.sh)`;
  if (spawnSync('id', ['-u', TOR_USER]).status !== 0) return `Tor's user ${TOR_USER} does not exist (the tor package makes it)`;
  return undefined;
}

function render(template: string, values: Record<string, string>): string {
  return readFileSync(join(TEMPLATES, template), 'utf8').replace(/\$\{([A-Z_]+)\}/g, (whole, key: string) => {
    const value = values[key];
    if (value === undefined) throw new Error(`test/fixtures/tor/${template}: no value for ${whole}`);
    return value;
  });
}

function run(argv: readonly string[], input = ''): string {
  const [cmd = '', ...args] = argv;
  const result = spawnSync(cmd, args, { input, encoding: 'utf8', timeout: 20_000 });
  if (result.status !== 0) throw new Error(`${argv.join(' ')} failed (${result.status ?? result.signal}): ${result.stderr}${result.stdout}`);
  return result.stdout;
}

function chownTree(path: string, uid: number, gid: number): void {
  chownSync(path, uid, gid);
  for (const entry of readdirSync(path, { withFileTypes: true })) {
    const inner = join(path, entry.name);
    if (entry.isDirectory()) chownTree(inner, uid, gid);
    else chownSync(inner, uid, gid);
  }
}

function tail(path: string, lines = 15): string {
  try {
    return readFileSync(path, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return '(no log)';
  }
}

function rssOf(pid: number | undefined): number {
  if (pid === undefined) return 0;
  try {
    return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/** What a child printed (tor prints its config errors there before it has a log file). */
const printedBy = new WeakMap<ChildProcess, () => string>();
function collect(child: ChildProcess): ChildProcess {
  let text = '';
  const add = (chunk: Buffer) => (text = (text + chunk.toString()).slice(-4000));
  child.stdout?.on('data', add);
  child.stderr?.on('data', add);
  printedBy.set(child, () => text);
  return child;
}

function said(child: ChildProcess, log: string): string {
  return `${printedBy.get(child)?.() ?? ''}\n${tail(log)}`;
}

function exited(child: ChildProcess): Promise<void> {
  return child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise((resolve) => child.once('exit', () => resolve()));
}

async function terminate(child: ChildProcess | undefined): Promise<void> {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  const killer = setTimeout(() => child.kill('SIGKILL'), 3000);
  await exited(child);
  clearTimeout(killer);
}

/** Relays listed in the authority's current consensus. */
function consensusRelays(authorityDir: string): number {
  try {
    return readFileSync(join(authorityDir, 'cached-consensus'), 'utf8')
      .split('\n')
      .filter((line) => line.startsWith('r ')).length;
  } catch {
    return 0;
  }
}

export async function startTorNetwork(net: TestNet, options: TorNetworkOptions): Promise<TorNetwork> {
  const reason = torUnavailableReason();
  if (reason) throw new Error(reason);
  const uid = Number(run(['id', '-u', TOR_USER]).trim());
  const gid = Number(run(['id', '-g', TOR_USER]).trim());
  const at = options.addresses ?? { authority: '203.0.113.101', middle: '203.0.113.102', exit: '203.0.113.103', dns: '203.0.113.53' };
  const socksPort = options.socksPort ?? 9050;
  const controlPort = options.controlPort ?? 9051;

  // Tor's user must walk down to its DataDirectories; the directories themselves are its own, 0700.
  const root = mkdtempSync(join(tmpdir(), 'egd-tor-'));
  chmodSync(root, 0o755);
  // tor reads a defaults file unless told another; an empty one keeps the system's out (/dev/null is refused).
  const empty = join(root, 'empty.torrc');
  writeFileSync(empty, '', { mode: 0o644 });
  const removeRoot = () => rmSync(root, { recursive: true, force: true });
  process.once('exit', removeRoot);
  const children: ChildProcess[] = [];
  let client: ChildProcess | undefined;
  let stopped = false;

  const stop = async () => {
    if (stopped) return;
    stopped = true;
    await Promise.all([...children, client].map(terminate));
    removeRoot();
    process.off('exit', removeRoot);
  };

  try {
    for (const address of [at.authority, at.middle, at.exit, at.dns]) await net.inet.addAddr(address);
    const dirOf = (nick: string) => {
      const dir = join(root, nick);
      mkdirSync(dir, { mode: 0o700 });
      return dir;
    };
    const relays = { authority: dirOf('auth'), middle: dirOf('middle'), exit: dirOf('exit'), client: dirOf('client') };

    // The authority's v3 keys, and every relay's identity (its fingerprint names it in DirAuthority).
    mkdirSync(join(relays.authority, 'keys'), { mode: 0o700 });
    run(
      [
        'tor-gencert',
        '--create-identity-key',
        '--passphrase-fd',
        '0',
        '-m',
        '12',
        '-a',
        `${at.authority}:${DIR_PORT}`,
        '-i',
        join(relays.authority, 'keys/authority_identity_key'),
        '-s',
        join(relays.authority, 'keys/authority_signing_key'),
        '-c',
        join(relays.authority, 'keys/authority_certificate'),
      ],
      '\n',
    );
    const v3ident = /^fingerprint ([0-9A-F]{40})$/m.exec(readFileSync(join(relays.authority, 'keys/authority_certificate'), 'utf8'))?.[1];
    if (!v3ident) throw new Error('tor-gencert wrote no fingerprint');
    const fingerprint = (dir: string, nick: string) => {
      const out = run([
        'tor',
        '--list-fingerprint',
        '--defaults-torrc',
        empty,
        '-f',
        empty,
        '--DataDirectory',
        dir,
        '--ORPort',
        String(OR_PORT),
        '--Nickname',
        nick,
        '--DirAuthority',
        'placeholder 127.0.0.1:1 ffffffffffffffffffffffffffffffffffffffff',
      ]);
      const found = new RegExp(`^${nick} ((?:[0-9A-F]{4} ?){10})$`, 'm').exec(out)?.[1];
      if (!found) throw new Error(`tor --list-fingerprint printed no fingerprint for ${nick}: ${out}`);
      return found.replace(/ /g, '');
    };
    const fingerprints = {
      authority: fingerprint(relays.authority, 'auth'),
      middle: fingerprint(relays.middle, 'middle'),
      exit: fingerprint(relays.exit, 'exit'),
    };
    const authorityLine = `DirAuthority auth orport=${OR_PORT} no-v2 v3ident=${v3ident} ${at.authority}:${DIR_PORT} ${fingerprints.authority}`;

    const names = Object.entries(options.names);
    writeFileSync(join(relays.exit, 'resolv.conf'), `nameserver ${at.dns}\n`);
    const torrc = (nick: keyof typeof relays, role: string, values: Record<string, string>) => {
      const dir = relays[nick];
      const text =
        render('common.torrc', {
          AUTHORITY: authorityLine,
          DIR: dir,
          GUARDS: `${fingerprints.authority},${fingerprints.middle}`,
          EXITS: fingerprints.exit,
        }) + render(role, { DIR: dir, NICK: nick, ORPORT: String(OR_PORT), ...values });
      writeFileSync(join(dir, 'torrc'), text);
      chownTree(dir, uid, gid);
      return join(dir, 'torrc');
    };
    const relayTorrc = {
      authority: torrc('authority', 'authority.torrc', { ADDRESS: at.authority, DIRPORT: String(DIR_PORT) }),
      middle: torrc('middle', 'middle.torrc', { ADDRESS: at.middle }),
      exit: torrc('exit', 'exit.torrc', {
        ADDRESS: at.exit,
        HOST_LINK: `${net.addrs.host.v4}/24:*,reject [${net.addrs.host.v6}]/64:*`,
        EXIT_POLICY: [...new Set(names.map(([, address]) => address))].map((address) => `ExitPolicy accept ${address}:*`).join('\n'),
      }),
    };
    const clientTorrc = torrc('client', 'client.torrc', { SOCKS: `127.0.0.1:${socksPort}`, CONTROL: `127.0.0.1:${controlPort}` });

    // The exit's DNS: the test's names, nothing else (no upstream, no hosts file).
    const dns = net.inet.spawn('dnsmasq', [...dnsmasqOnly(at.dns), '--user=root', ...names.map(([name, address]) => `--host-record=${name},${address}`)]);
    children.push(dns);

    const started = Date.now();
    const startRelay = (nick: 'authority' | 'middle' | 'exit'): Relay => {
      const child = collect(net.inet.spawn('tor', ['--defaults-torrc', empty, '-f', relayTorrc[nick]], { user: TOR_USER, group: TOR_USER }));
      children.push(child);
      return { nick, address: at[nick], dir: relays[nick], process: child };
    };
    const authority = startRelay('authority');
    const middle = startRelay('middle');
    const exit = startRelay('exit');
    const all = [authority, middle, exit];
    await until(
      `a consensus listing all three relays (authority log:\n${tail(join(relays.authority, 'notice.log'))})`,
      () => {
        const dead = all.find((relay) => relay.process.exitCode !== null);
        if (dead) throw new Error(`tor ${dead.nick} exited: ${said(dead.process, join(dead.dir, 'notice.log'))}`);
        return consensusRelays(relays.authority) >= 3;
      },
      { timeoutMs: 60_000, everyMs: 100 },
    );
    const consensusMs = Date.now() - started;

    const control = { host: '127.0.0.1', port: controlPort, socket: join(relays.client, 'control'), cookieFile: join(relays.client, 'control_auth_cookie') };
    const clientStatus = () => readTorStatus({ socket: control.socket, cookieFile: control.cookieFile });
    // Bootstrapped with a circuit is not yet ready to exit: the client may still lack the
    // exit's descriptor. Ready is a name resolved at the exit, through a circuit, over SOCKS.
    const [probeName, probeAddress] = names[0] ?? [];
    const startClient = async (): Promise<ClientTimes> => {
      const begun = Date.now();
      client = collect(net.host.spawn('tor', ['--defaults-torrc', empty, '-f', clientTorrc], { user: TOR_USER, group: TOR_USER }));
      const self = client;
      const log = join(relays.client, 'notice.log');
      await until(
        `the host's tor bootstrapped with a circuit (its log:\n${tail(log)})`,
        async () => {
          if (self.exitCode !== null) throw new Error(`the host's tor exited: ${said(self, log)}`);
          const status = await clientStatus();
          return status.reachable && status.bootstrap === 100 && status.circuitEstablished;
        },
        { timeoutMs: 60_000, everyMs: 100 },
      );
      const bootstrapMs = Date.now() - begun;
      if (probeName === undefined) return { bootstrapMs, exitReadyMs: bootstrapMs };
      await until(
        `${probeName} resolved at the exit through the host's tor (its log:\n${tail(log)})`,
        async () => {
          if (self.exitCode !== null) throw new Error(`the host's tor exited: ${said(self, log)}`);
          const resolved = await net.host.exec('tor-resolve', ['-5', probeName, `127.0.0.1:${socksPort}`], {
            timeoutMs: 10_000,
            ...(options.probeAs === undefined ? {} : { user: options.probeAs }),
          });
          return resolved.stdout.trim() === probeAddress;
        },
        { timeoutMs: 60_000, everyMs: 200 },
      );
      return { bootstrapMs, exitReadyMs: Date.now() - begun };
    };
    const clientTimes = await startClient();

    return {
      root,
      authority,
      middle,
      exit,
      relayAddresses: [at.authority, at.middle, at.exit],
      dnsAddress: at.dns,
      client: { dir: relays.client, socks: { host: '127.0.0.1', port: socksPort }, control },
      times: { consensusMs, client: clientTimes },
      get clientRunning() {
        return client !== undefined && client.exitCode === null && client.signalCode === null;
      },
      async stopClient(options = {}) {
        if (options.crash && client && client.exitCode === null && client.signalCode === null) {
          client.kill('SIGKILL');
          await exited(client);
        }
        await terminate(client);
      },
      startClient,
      clientStatus,
      rssKiB: () => [...all.map((relay) => relay.process.pid), client?.pid].reduce((sum: number, pid) => sum + rssOf(pid), 0),
      stop,
    };
  } catch (error) {
    await stop();
    throw error;
  }
}
