import { readSwitches } from '../state/switches.js';
import { nssAccounts } from '../system/nss.js';
import { readTorStatus, type TorControlAddress } from './control.js';
import { DEBIAN_CONTROL, readTorConfig, socksText, type Socks } from './files.js';
import { isTorsListener, listenerAt } from './listener.js';
import { updatesLine, type TorStatus } from './status.js';
import { parseSocks, readTorRecord, type TorRecord } from './switch.js';

/**
 * `egressctl tor status` and the line `egressctl status` adds: whether the
 * switch is on (as the last apply recorded it in switches.json, or as the
 * caller saw it in the live table), and whether Tor can carry updates now
 * (its control port).
 */

export interface TorSwitchStatus {
  /** Updates over Tor as in force: the live table when the caller read it, else switches.json. */
  readonly torUpdates: boolean;
  /** Since when, from switches.json; null without a usable record. */
  readonly since: string | null;
  /** Where `torUpdates` came from. */
  readonly from: 'table' | 'switches.json' | 'none';
  /** The switch record is there but cannot be used (said why). */
  readonly switchesProblem: string | null;
  /** What "egressctl tor enable" recorded, or null. */
  readonly enabled: { readonly at: string; readonly socks: string; readonly updaters: readonly string[]; readonly files: readonly string[] } | null;
  readonly control: TorControlAddress | null;
  readonly tor: TorStatus | null;
  readonly line: string;
}

/** Where Tor's control port is: as enable recorded it, else as Tor's configuration says, else Debian's default. */
export function controlAddress(root: string, record: TorRecord | undefined): TorControlAddress | null {
  if (record) {
    const c = record.control;
    if (!c) return null;
    return {
      cookieFile: c.cookieFile,
      ...(c.socket !== undefined && { socket: c.socket }),
      ...(c.host !== undefined && { host: c.host }),
      ...(c.port !== undefined && { port: c.port }),
    };
  }
  return readTorConfig(root).control ?? DEBIAN_CONTROL;
}

/** Who holds the SOCKS port, and who Tor's user is: passed in by tests, sock_diag and NSS otherwise. */
export interface SocksOwnerDeps {
  readonly socksListener: (socks: Socks) => { uid: number } | null;
  readonly uidOf: (user: string | number) => number | undefined;
}

const systemSocksOwner = (): SocksOwnerDeps => ({
  socksListener: listenerAt,
  uidOf: (user) => {
    if (typeof user === 'number') return user;
    const row = nssAccounts().user(user);
    return row && !('error' in row) ? row.uid : undefined;
  },
});

/**
 * The SOCKS port held by a socket that is not Tor's (nor root's): the table
 * drops everything it sends (tor/socks-answer), so updates cannot work
 * whatever Tor's control port says — Tor itself could not open the port.
 * Where enable recorded it, else the policy's defaults.
 */
function socksHeldByOther(record: TorRecord | undefined, deps: SocksOwnerDeps): string | undefined {
  const socks = parseSocks(record?.socks ?? '127.0.0.1:9050');
  const listener = deps.socksListener(socks);
  const torUser = record?.torUser ?? 'debian-tor';
  if (!listener || isTorsListener(listener, deps.uidOf(torUser))) return undefined;
  return `${socksText(socks)} is held by uid ${listener.uid}, not Tor (${JSON.stringify(torUser)})`;
}

export async function torSwitchStatus(options: {
  root: string;
  stateDir: string;
  liveTorUpdates?: boolean;
  timeoutMs?: number;
  socksOwner?: SocksOwnerDeps;
}): Promise<TorSwitchStatus> {
  const switches = readSwitches(options.stateDir);
  let record: TorRecord | undefined;
  let recordProblem: string | null = null;
  try {
    record = readTorRecord(options.stateDir);
  } catch (error) {
    recordProblem = (error as Error).message;
  }
  const recorded = switches.state === 'ok' ? switches.value.torUpdates : undefined;
  const torUpdates = options.liveTorUpdates ?? recorded?.on ?? false;
  const from = options.liveTorUpdates !== undefined ? 'table' : recorded ? 'switches.json' : 'none';
  const control = controlAddress(options.root, record);
  let tor: TorStatus | null = null;
  const heldBy = torUpdates ? socksHeldByOther(record, options.socksOwner ?? systemSocksOwner()) : undefined;
  if (heldBy !== undefined) tor = { reachable: false, reason: heldBy, socksHeld: true };
  else if (torUpdates) {
    tor = control
      ? await readTorStatus(control, { timeoutMs: options.timeoutMs ?? 2_000 }).catch((error: unknown) => ({
          reachable: false as const,
          reason: `unreadable (${(error as Error).message})`,
        }))
      : { reachable: false, reason: 'has no control port egressd can read (no cookie authentication)' };
  }
  return {
    torUpdates,
    since: recorded?.since ?? null,
    from,
    switchesProblem: switches.state === 'damaged' ? switches.problem : recordProblem,
    enabled: record ? { at: record.enabledAt, socks: record.socks, updaters: record.updaters, files: record.files.map((f) => f.path) } : null,
    control,
    tor,
    line: updatesLine(torUpdates, tor ?? undefined),
  };
}
