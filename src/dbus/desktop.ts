/**
 * Desktop notifications through org.freedesktop.Notifications on the
 * user's session bus (the Desktop Notifications Specification): Notify with
 * actions, and the ActionInvoked and NotificationClosed signals, taken only
 * from the connection that owns the name.
 */
import dbus from 'dbus-next';
import type { Notification } from './notifier.js';

const { Message, Variant } = dbus;
type Message = InstanceType<typeof Message>;

const NAME = 'org.freedesktop.Notifications';
const PATH = '/org/freedesktop/Notifications';

export interface Desktop {
  notify(n: Notification): Promise<number>;
  onAction(listener: (id: number, key: string) => void): void;
  onClosed(listener: (id: number) => void): void;
  /** Settles when the session bus connection is lost. */
  readonly lost: Promise<unknown>;
  close(): void;
}

/** The desktop, or why there is none (no session bus, no notification service): then the agent prints to the terminal. */
export async function connectDesktop(options: { busAddress?: string; appName?: string; timeoutMs?: number } = {}): Promise<Desktop | { unavailable: string }> {
  const address = options.busAddress ?? process.env['DBUS_SESSION_BUS_ADDRESS'];
  if (!address) return { unavailable: 'no session bus (DBUS_SESSION_BUS_ADDRESS is not set)' };
  let bus: dbus.MessageBus;
  try {
    bus = dbus.sessionBus({ busAddress: address });
  } catch (error) {
    return { unavailable: `no session bus: ${(error as Error).message}` };
  }
  let lostResolve: (why: unknown) => void = () => undefined;
  const lost = new Promise<unknown>((resolve) => (lostResolve = resolve));
  const connected = await new Promise<true | string>((resolve) => {
    const timer = setTimeout(() => resolve('the session bus did not answer'), options.timeoutMs ?? 5000);
    bus.once('connect', () => {
      clearTimeout(timer);
      resolve(true);
    });
    bus.on('error', (error: unknown) => {
      clearTimeout(timer);
      lostResolve(error);
      resolve(`no session bus: ${(error as Error).message}`);
    });
  });
  if (connected !== true) {
    bus.disconnect();
    return { unavailable: connected };
  }
  const call = async (destination: string, path: string, iface: string, member: string, signature: string, body: unknown[]) =>
    ((await bus.call(new Message({ destination, path, interface: iface, member, signature, body })))?.body as unknown[] | undefined) ?? [];
  let owner: string;
  try {
    // GetServerInformation starts a D-Bus-activated notification daemon; then the owner is known.
    await call(NAME, PATH, NAME, 'GetServerInformation', '', []);
    owner = (await call('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus', 'GetNameOwner', 's', [NAME]))[0] as string;
    await call('org.freedesktop.DBus', '/org/freedesktop/DBus', 'org.freedesktop.DBus', 'AddMatch', 's', [
      `type='signal',sender='${NAME}',path='${PATH}',interface='${NAME}'`,
    ]);
  } catch (error) {
    bus.disconnect();
    return { unavailable: `no notification service on the session bus (${(error as { type?: string }).type ?? (error as Error).message})` };
  }
  const actions: ((id: number, key: string) => void)[] = [];
  const closes: ((id: number) => void)[] = [];
  bus.on('message', (msg: Message) => {
    if (msg.type !== dbus.MessageType.SIGNAL || msg.sender !== owner || msg.interface !== NAME || msg.path !== PATH) return;
    if (msg.member === 'ActionInvoked' && msg.signature === 'us') for (const l of actions) l(msg.body[0] as number, msg.body[1] as string);
    if (msg.member === 'NotificationClosed' && msg.signature === 'uu') for (const l of closes) l(msg.body[0] as number);
  });
  (bus as unknown as { _connection: NodeJS.EventEmitter })._connection.on('end', () => lostResolve(new Error('the session bus closed the connection')));
  const appName = options.appName ?? 'egressd';
  return {
    lost,
    async notify(n) {
      const [id] = await call(NAME, PATH, NAME, 'Notify', 'susssasa{sv}i', [
        appName,
        n.replacesId,
        'security-high',
        n.summary,
        n.body,
        [...n.actions],
        { urgency: new Variant('y', 1), category: new Variant('s', 'network') },
        -1,
      ]);
      return id as number;
    },
    onAction: (listener) => actions.push(listener),
    onClosed: (listener) => closes.push(listener),
    close: () => bus.disconnect(),
  };
}
