/**
 * The client side of org.egressd.Firewall1, for egressctl (allow, notify)
 * and tests. D-Bus errors come back as EgressError with the code the
 * service mapped them from (service.ts dbusErrorName), so the CLI's exit
 * codes hold across the bus. Denied signals are taken only from the
 * connection that owns org.egressd.Firewall1: anyone can address a signal
 * to an agent, and the bus stamps the true sender on it.
 */
import dbus from 'dbus-next';
import type { DenialRecord } from '../denials/record.js';
import { EgressError, ErrorCode } from '../errors.js';
import type { DenialFilter } from './contracts.js';
import { BUS_NAME, codeOfDbusError, connectBus, INTERFACE, OBJECT_PATH } from './service.js';
import { filterToDbus, recordFromDbus } from './wire.js';

const { Message, Variant } = dbus;
type Message = InstanceType<typeof Message>;

export type ClientRecord = DenialRecord & { id?: number };

export interface FirewallClient {
  status(): Promise<Record<string, unknown>>;
  reload(): Promise<{ digest: string }>;
  queryDenials(filter: DenialFilter): Promise<ClientRecord[]>;
  allowFromDenial(recordId: number, scope: string): Promise<Record<string, unknown>>;
  /** egressctl allow --app NAME --to DEST: an allow not taken from a record. */
  allow(app: string, to: readonly string[], options: { ports?: readonly number[]; proto?: string }, scope: string): Promise<Record<string, unknown>>;
  /** Denied records for this caller (its own uid; `all` for root and audit); `listener` gets each with its store id (0: unknown). */
  subscribe(listener: (record: ClientRecord, id: number) => void, options?: { all?: boolean }): Promise<{ uid: number; all: boolean }>;
  /** Settles when the connection is lost or the service leaves the bus. */
  readonly lost: Promise<unknown>;
  /** This connection's unique name on the bus. */
  readonly uniqueName: string;
  close(): void;
}

const UNAVAILABLE = new Set([
  'org.freedesktop.DBus.Error.ServiceUnknown',
  'org.freedesktop.DBus.Error.NameHasNoOwner',
  'org.freedesktop.DBus.Error.NoReply',
  'org.freedesktop.DBus.Error.Disconnected',
]);

/** A D-Bus error as an EgressError: the service's own names map back to their codes. */
export function fromDbusError(error: unknown): EgressError {
  if (error instanceof EgressError) return error;
  const type = (error as { type?: string }).type;
  const text: unknown = (error as { text?: unknown }).text ?? (error as { message?: unknown }).message;
  const [message = '', ...details] = String(text).split('\n');
  const code = type === undefined ? undefined : codeOfDbusError(type);
  if (code) return new EgressError(code, message, { details });
  if (type !== undefined && UNAVAILABLE.has(type)) return new EgressError(ErrorCode.DaemonUnavailable, `egressd is not running on the bus (${type})`);
  if (type === 'org.freedesktop.DBus.Error.AccessDenied') return new EgressError(ErrorCode.AccessDenied, `the bus refused the call: ${message}`);
  return new EgressError(ErrorCode.Io, `D-Bus: ${type ?? 'error'}: ${message}`, { details });
}

function unwrap(dict: Record<string, { value: unknown }>): Record<string, unknown> {
  return Object.fromEntries(Object.entries(dict).map(([k, v]) => [k, typeof v.value === 'bigint' ? Number(v.value) : v.value]));
}

export async function connectFirewall(options: { busAddress?: string; timeoutMs?: number } = {}): Promise<FirewallClient> {
  let bus: dbus.MessageBus;
  try {
    bus = connectBus(options.busAddress);
  } catch (error) {
    throw new EgressError(ErrorCode.DaemonUnavailable, `no system bus: ${(error as Error).message}`);
  }
  let lostResolve: (why: unknown) => void = () => undefined;
  const lost = new Promise<unknown>((resolve) => (lostResolve = resolve));
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new EgressError(ErrorCode.DaemonUnavailable, 'the system bus did not answer')), options.timeoutMs ?? 5000);
    bus.once('connect', () => {
      clearTimeout(timer);
      resolve();
    });
    bus.on('error', (error: unknown) => {
      clearTimeout(timer);
      lostResolve(error);
      reject(new EgressError(ErrorCode.DaemonUnavailable, `no system bus: ${(error as Error).message}`));
    });
  }).catch((error: unknown) => {
    bus.disconnect();
    throw error;
  });
  (bus as unknown as { _connection: NodeJS.EventEmitter })._connection.on('end', () => lostResolve(new Error('the bus closed the connection')));

  const callBus = async (
    member: string,
    signature: string,
    body: unknown[],
    iface = INTERFACE,
    destination = BUS_NAME,
    path = OBJECT_PATH,
  ): Promise<unknown[]> => {
    try {
      const reply = await bus.call(new Message({ destination, path, interface: iface, member, signature, body }));
      return (reply?.body as unknown[] | undefined) ?? [];
    } catch (error) {
      throw fromDbusError(error);
    }
  };
  const dbusCall = (member: string, signature: string, body: unknown[], iface?: string, destination?: string, path?: string) =>
    callBus(member, signature, body, iface, destination, path);

  let owner: string | undefined;
  const listeners: ((record: ClientRecord, id: number) => void)[] = [];
  bus.on('message', (msg: Message) => {
    if (msg.type !== dbus.MessageType.SIGNAL) return;
    if (msg.sender === 'org.freedesktop.DBus' && msg.member === 'NameOwnerChanged' && msg.body[0] === BUS_NAME) {
      owner = (msg.body[2] as string) || undefined;
      if (owner === undefined && listeners.length > 0) lostResolve(new Error(`${BUS_NAME} left the bus`));
      return;
    }
    if (msg.interface !== INTERFACE || msg.member !== 'Denied' || msg.signature !== 'a{sv}t' || msg.path !== OBJECT_PATH) return;
    if (owner === undefined || msg.sender !== owner) return;
    const record = recordFromDbus(msg.body[0] as Record<string, InstanceType<typeof Variant>>);
    const id = Number(msg.body[1] as bigint);
    for (const listener of listeners) listener(record, id);
  });

  return {
    lost,
    uniqueName: (bus as unknown as { name: string }).name,
    async status() {
      const [dict] = await dbusCall('Status', '', []);
      return unwrap(dict as Record<string, { value: unknown }>);
    },
    async reload() {
      const [dict] = await dbusCall('Reload', '', []);
      return unwrap(dict as Record<string, { value: unknown }>) as { digest: string };
    },
    async queryDenials(filter) {
      const [list] = await dbusCall('QueryDenials', 'a{sv}', [filterToDbus(filter)]);
      return (list as Record<string, InstanceType<typeof Variant>>[]).map(recordFromDbus);
    },
    async allowFromDenial(recordId, scope) {
      const [dict] = await dbusCall('AllowFromDenial', 'ts', [recordId, scope]);
      return unwrap(dict as Record<string, { value: unknown }>);
    },
    async allow(app, to, opts, scope) {
      const options: Record<string, InstanceType<typeof Variant>> = {};
      if (opts.ports?.length) options['ports'] = new Variant('aq', [...opts.ports]);
      if (opts.proto) options['proto'] = new Variant('s', opts.proto);
      const [dict] = await dbusCall('Allow', 'sasa{sv}s', [app, [...to], options, scope]);
      return unwrap(dict as Record<string, { value: unknown }>);
    },
    async subscribe(listener, opts = {}) {
      await dbusCall(
        'AddMatch',
        's',
        [`type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='${BUS_NAME}'`],
        'org.freedesktop.DBus',
        'org.freedesktop.DBus',
        '/org/freedesktop/DBus',
      );
      const [name] = await dbusCall('GetNameOwner', 's', [BUS_NAME], 'org.freedesktop.DBus', 'org.freedesktop.DBus', '/org/freedesktop/DBus');
      owner = name as string;
      listeners.push(listener);
      const [dict] = await dbusCall('Subscribe', 'a{sv}', [opts.all ? { all: new Variant('b', true) } : {}]);
      return unwrap(dict as Record<string, { value: unknown }>) as { uid: number; all: boolean };
    },
    close() {
      bus.disconnect();
    },
  };
}
