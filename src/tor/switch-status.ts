import { readSwitches } from '../state/switches.js';
import { readTorStatus, type TorControlAddress } from './control.js';
import { DEBIAN_CONTROL, readTorConfig } from './files.js';
import { updatesLine, type TorStatus } from './status.js';
import { readTorRecord, type TorRecord } from './switch.js';

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

export async function torSwitchStatus(options: { root: string; stateDir: string; liveTorUpdates?: boolean; timeoutMs?: number }): Promise<TorSwitchStatus> {
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
  if (torUpdates) {
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
