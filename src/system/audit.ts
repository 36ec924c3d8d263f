import { spawnSync } from 'node:child_process';

/**
 * Records a change of enforcement in the system log (the journal on systemd
 * machines) with stable key=value fields, through logger(1). Best effort: a
 * machine without a syslog still gets the change; the caller also tells the
 * person at the terminal.
 */
export function systemAudit(event: string, fields: Readonly<Record<string, string | number | boolean>>): void {
  const text = Object.entries(fields)
    .map(([key, value]) => `${key}=${typeof value === 'string' && /\s/.test(value) ? JSON.stringify(value) : String(value)}`)
    .join(' ');
  spawnSync('logger', ['--tag', 'egressd', '--priority', 'auth.notice', '--', `EGRESSD_EVENT="${event}" ${text}`], { stdio: 'ignore', timeout: 2_000 });
}
