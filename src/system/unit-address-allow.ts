/**
 * The addresses egressd's own unit may talk to, set while it runs.
 *
 * egressd.service has `IPAddressDeny=any` and `IPAddressAllow=localhost`:
 * systemd's BPF program on the unit's cgroup drops every packet egressd's
 * processes send to (or receive from) anywhere else, so a bug or an exploit
 * in the process that parses DNS answers and D-Bus calls cannot reach the
 * network. Its resolver must reach its upstreams, which are known only at
 * run time (the policy's, or the machine's own, which DHCP changes), so the
 * resolver allows exactly those (`systemctl set-property --runtime`: gone
 * at reboot) before it asks them, and again when they change: the old ones
 * are allowed no longer.
 *
 * One call both clears the list and sets the new one (systemd merges a
 * non-empty list into what is there, and an empty one clears it): the BPF
 * program is rebuilt once, after the call, so there is no moment with
 * loopback missing. Nothing here runs where it has nothing to do: outside
 * a systemd unit (a container, the foreground, tests), or in a unit with no
 * IPAddressDeny.
 */
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { networkContains, parseNetwork } from '../policy/destination.js';
import { parseProcCgroup } from './capabilities.js';

/** A network as the unit's list holds it. */
export interface UnitNet {
  readonly family: 4 | 6;
  readonly address: string;
  readonly prefix: number;
}

/** What `localhost` means in a unit file (systemd.resource-control(5)): 127.0.0.0/8 and ::1/128. */
const LOOPBACK: readonly UnitNet[] = [
  { family: 4, address: '127.0.0.0', prefix: 8 },
  { family: 6, address: '::1', prefix: 128 },
];

const isLoopback = (family: 4 | 6, address: string): boolean => LOOPBACK.some((net) => networkContains(net, family, address));

/**
 * The unit's allow list for these upstreams ("ADDR" or "ADDR#PORT"): loopback, and each other address alone (a
 * loopback upstream — stubby, dnscrypt-proxy on 127.0.0.1#5353 — is in loopback already). Pure.
 */
export function allowListFor(upstreams: readonly string[]): UnitNet[] {
  const out: UnitNet[] = [...LOOPBACK];
  for (const upstream of upstreams) {
    const host = upstream.split('#')[0] ?? '';
    const parsed = parseNetwork(host);
    if (!parsed.ok || /[/%]/.test(host)) throw new Error(`upstream "${upstream}" is not ADDR or ADDR#PORT`);
    const { family, address, prefix } = parsed.value;
    if (isLoopback(family, address) || out.some((net) => net.address === address)) continue;
    out.push({ family, address, prefix });
  }
  return out;
}

/** A network as text, for systemctl and logs: "127.0.0.0/8", "2001:db8::1/128" (addresses canonical, as parseNetwork writes them). */
export function prefixText(net: UnitNet): string {
  return `${net.address}/${net.prefix}`;
}

export type UnitAllowOutcome =
  /** The unit's allow list is now loopback and these upstreams. */
  | { readonly kind: 'set'; readonly unit: string; readonly allowed: readonly string[] }
  /** Nothing to do: not started by systemd, or the unit denies nothing. */
  | { readonly kind: 'unconfined'; readonly why: string };

export interface UnitAllowOptions {
  /**
   * The unit egressd is the process of; default: the last part of its
   * cgroup when systemd started this very process (SYSTEMD_EXEC_PID is its
   * pid: children of a unit, a CI runner's tests among them, inherit the
   * variable but not the pid), else none.
   */
  readonly unit?: string | undefined;
  /** `systemctl`, run with argv; default /usr/bin/systemctl, which talks to systemd's private socket (no D-Bus daemon needed). */
  readonly systemctl?: (args: readonly string[]) => Promise<string>;
}

/** The unit systemd started this process as, or undefined. */
export function ownUnit(env: NodeJS.ProcessEnv = process.env, pid = process.pid, cgroupFile = '/proc/self/cgroup'): string | undefined {
  if (env['SYSTEMD_EXEC_PID'] !== String(pid)) return undefined;
  let text: string;
  try {
    text = readFileSync(cgroupFile, 'utf8');
  } catch {
    return undefined;
  }
  const path = parseProcCgroup(text) ?? '';
  const last = path.slice(path.lastIndexOf('/') + 1);
  return /^[\w:@.\\-]+\.service$/.test(last) ? last : undefined;
}

function runSystemctl(args: readonly string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('/usr/bin/systemctl', [...args], { timeout: 10_000, encoding: 'utf8' }, (error, stdout, stderr) => {
      if (error) reject(new Error(`systemctl ${args.join(' ')}: ${stderr.trim() || error.message}`));
      else resolve(stdout);
    });
  });
}

/**
 * Lets egressd's unit reach exactly these upstreams (and loopback). Throws
 * when the unit denies addresses and the list could not be set, or was not
 * read back as set: the resolver must not start believing it can ask
 * servers the kernel will not let it reach.
 *
 * Through systemctl and so systemd's private socket, not the system bus:
 * egressd starts before the network, and nothing orders the D-Bus daemon
 * before it.
 */
export function allowUnitUpstreams(upstreams: readonly string[], options: UnitAllowOptions = {}): Promise<UnitAllowOutcome> {
  // One at a time, in the order asked: a closing resolver's reset and its successor's set must not interleave their
  // set and read-back (the reset landing last would leave the new upstreams dropped while the resolver believes them let through).
  const run = queue.then(() => allowNow(upstreams, options));
  queue = run.catch(() => undefined);
  return run;
}

let queue: Promise<unknown> = Promise.resolve();

async function allowNow(upstreams: readonly string[], options: UnitAllowOptions): Promise<UnitAllowOutcome> {
  const unit = 'unit' in options ? options.unit : ownUnit();
  if (unit === undefined) return { kind: 'unconfined', why: 'not started by systemd' };
  const wantedNets = allowListFor(upstreams);
  const wanted = wantedNets.map(prefixText);
  const systemctl = options.systemctl ?? runSystemctl;
  const show = async (): Promise<Record<string, string>> =>
    Object.fromEntries(
      (await systemctl(['show', unit, '--property=IPAddressDeny', '--property=IPAddressAllow']))
        .split('\n')
        .filter((line) => line.includes('='))
        .map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]),
    );
  if ((await show())['IPAddressDeny']?.trim() === '') return { kind: 'unconfined', why: `${unit} denies no address` };
  // One call: systemd clears the list (the empty value), then sets the new one, and rebuilds its BPF program once, after both.
  await systemctl(['set-property', '--runtime', unit, 'IPAddressAllow=', `IPAddressAllow=${wanted.join(' ')}`]);
  // systemd may print a prefix its own way or fold one into a wider one it holds: what counts is that each is covered.
  const held = ((await show())['IPAddressAllow'] ?? '').split(/\s+/).filter(Boolean);
  const heldNets = held.flatMap((text) => {
    const parsed = parseNetwork(text);
    return parsed.ok ? [parsed.value] : [];
  });
  const missing = wantedNets.filter((want) => !heldNets.some((net) => net.prefix <= want.prefix && networkContains(net, want.family, want.address)));
  if (missing.length > 0)
    throw new Error(`${unit}'s IPAddressAllow lacks ${missing.map(prefixText).join(', ')} after it was set (it holds: ${held.join(' ')})`);
  // …and nothing more: a systemd that merged instead of clearing would keep the old upstreams let through.
  const extra = heldNets.filter((net) => !isLoopback(net.family, net.address) && !wanted.includes(prefixText(net)));
  if (extra.length > 0) throw new Error(`${unit}'s IPAddressAllow still lets through ${extra.map(prefixText).join(', ')} after it was set`);
  return { kind: 'set', unit, allowed: wanted };
}
