/**
 * Who is calling, from the bus's own word: the uid and pid the bus daemon
 * read off the caller's socket (SO_PEERCRED) when it connected
 * (org.freedesktop.DBus.GetConnectionCredentials). Nothing a caller sends —
 * no argument, no header it sets — names who it is. Memberships of the audit
 * group are looked up through NSS (src/system/nss.ts), as login and polkit
 * see them, not from the caller's process groups: removing someone from
 * egressd-audit takes effect within seconds (the service reuses a uid's role
 * for a few seconds: NSS lookups are synchronous), not at the next login.
 */
import { execFile } from 'node:child_process';
import dbus from 'dbus-next';
import type { Accounts } from '../system/nss.js';
import { EgressError, ErrorCode } from '../errors.js';

/** root may change and read everything; audit may read every denial; user sees only its own. */
export type Role = 'root' | 'audit' | 'user';

export interface Caller {
  /** The unique bus name (":1.42"). */
  readonly sender: string;
  readonly uid: number;
  readonly pid: number | undefined;
  readonly role: Role;
  /** The user's name, when NSS knows the uid. */
  readonly name: string | undefined;
}

export const DEFAULT_AUDIT_GROUP = 'egressd-audit';

/**
 * The polkit actions egressd asks about (systemd/org.egressd.policy).
 * allow-from-denial opens what a denial of the caller's own uid was denied,
 * and nothing else; allow opens any destination for any app. They are two
 * actions so that a rule granting the first (a user's own alerts) does not
 * grant the second.
 */
export type PolkitAction = 'org.egressd.allow-from-denial' | 'org.egressd.allow' | 'org.egressd.reload';

/**
 * What the call would do, as polkit's details: the action's message names
 * them (`$(app)`), so the authentication dialog says what is being allowed,
 * and a polkit rule may look them up (`action.lookup("app")`).
 */
export type PolkitDetails = Readonly<Record<string, string>>;

/** Asks polkit whether the bus name may do an action; false when polkit says no or cannot be asked. */
export type PolkitCheck = (sender: string, action: PolkitAction, details: PolkitDetails) => Promise<boolean>;

/**
 * polkit through pkcheck, by bus name: polkitd asks the bus itself who that
 * is (no pid to race), and may ask the person through their session's
 * authentication agent. Only for a service on the machine's system bus,
 * where polkitd is. A check that has not answered in `timeoutMs` (the
 * person did not answer the dialog) is a no, and its pkcheck is killed: each
 * holds one of the service's few check slots (service.ts) meanwhile.
 * polkit takes details only from root (or the action's owner): egressd is root.
 */
export const PKCHECK_TIMEOUT_MS = 30_000;

export function pkcheckPolkit(binary = 'pkcheck', timeoutMs = PKCHECK_TIMEOUT_MS): PolkitCheck {
  return (sender, action, details) =>
    new Promise((resolve) => {
      const detailArgs = Object.entries(details).flatMap(([key, value]) => ['--detail', key, value]);
      execFile(binary, ['--action-id', action, '--system-bus-name', sender, '--allow-user-interaction', ...detailArgs], { timeout: timeoutMs }, (error) =>
        resolve(error === null),
      );
    });
}

/** Calls a method of the bus itself (org.freedesktop.DBus) that takes one string; its reply's first value. */
export async function askBus(bus: dbus.MessageBus, member: string, arg: string): Promise<unknown> {
  const reply = await bus.call(
    new dbus.Message({
      destination: 'org.freedesktop.DBus',
      path: '/org/freedesktop/DBus',
      interface: 'org.freedesktop.DBus',
      member,
      signature: 's',
      body: [arg],
    }),
  );
  return reply?.body[0];
}

export async function callerCredentials(bus: dbus.MessageBus, sender: string): Promise<{ uid: number; pid: number | undefined }> {
  const creds = ((await askBus(bus, 'GetConnectionCredentials', sender)) ?? {}) as Record<string, { value: unknown } | undefined>;
  const uid = creds['UnixUserID']?.value;
  const pid = creds['ProcessID']?.value;
  if (typeof uid !== 'number') throw new EgressError(ErrorCode.AccessDenied, 'the bus did not say which user is calling');
  return { uid, pid: typeof pid === 'number' ? pid : undefined };
}

/** The caller's role: uid 0 is root; a member of the audit group (by NSS, primary or listed) is audit; anyone else a user. A lookup that fails counts as no membership. */
export function roleOf(uid: number, accounts: Accounts, auditGroup: string): { role: Role; name: string | undefined } {
  const row = accounts.user(uid);
  const name = row !== undefined && !('error' in row) ? row.name : undefined;
  if (uid === 0) return { role: 'root', name };
  const group = accounts.group(auditGroup);
  if (name === undefined || row === undefined || 'error' in row || group === undefined || 'error' in group) return { role: 'user', name };
  if (row.gid === group.gid) return { role: 'audit', name };
  const groups = accounts.groupsOf(name, row.gid);
  return { role: !('error' in groups) && groups.includes(group.gid) ? 'audit' : 'user', name };
}
