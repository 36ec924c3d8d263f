/**
 * How the state of updates over Tor is told, in one line, by `egressctl
 * status`, `egressctl tor status`, the D-Bus Status and systemd's STATUS=:
 * whether the switch is on (the policy in force), and whether Tor can carry
 * updates right now (its control port). Pure: the control-port client
 * (control.ts) fills `TorStatus`.
 */

/** What Tor's control port said, or why it could not be asked. */
export type TorStatus =
  | {
      readonly reachable: true;
      /** Bootstrap progress, 0–100 (GETINFO status/bootstrap-phase PROGRESS=). */
      readonly bootstrap: number;
      /** The phase's SUMMARY, e.g. "Done". */
      readonly summary: string;
      /** GETINFO status/circuit-established. */
      readonly circuitEstablished: boolean;
      readonly version?: string;
    }
  | {
      readonly reachable: false;
      /** "not running" (nothing listens), "cookie unreadable", "authentication refused", … — said to a person. */
      readonly reason: string;
      /** Not Tor's state: something else holds the SOCKS port (the reason says who); the table drops what it sends. */
      readonly socksHeld?: true;
    };

export function updatesLine(torUpdatesOn: boolean, status: TorStatus | undefined): string {
  if (!torUpdatesOn) return 'updates: direct (updates over Tor off)';
  if (status?.reachable === false && status.socksHeld) return `updates: blocked — ${status.reason}`;
  if (status === undefined || !status.reachable) return `updates: blocked — Tor ${status?.reason ?? 'not running'}`;
  if (status.bootstrap < 100) return `updates: blocked — Tor bootstrapping (${status.bootstrap} %: ${status.summary})`;
  if (!status.circuitEstablished) return 'updates: blocked — Tor has no circuit';
  return `updates: over Tor (bootstrapped ${status.bootstrap} %)`;
}
