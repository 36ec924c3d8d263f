/**
 * systemd's word on units coming and going, for the app tracker: the
 * Manager's UnitNew, UnitRemoved and JobRemoved signals on the system bus
 * (dbus-next), each turned into the cgroup path systemd gives the unit
 * (its ControlGroup property). A signal is a doorbell, not the truth: the
 * tracker looks at cgroupfs for whatever path it is told, so a signal that
 * lies or comes late changes nothing but when the tracker looks.
 *
 * Why both this and inotify: inotify on cgroupfs sees every mkdir, but a
 * full inotify queue loses events without a word through Node's fs.watch;
 * systemd tells of its units whatever the queue did. What systemd does not
 * tell on the system bus: what a user's own manager makes (a user's apps,
 * Flatpak scopes) — that is inotify's alone.
 *
 * Bounded: at most `maxPending` units wait for their property at once, and
 * each unit is asked about once while it waits (a burst of signals for one
 * unit asks once); what is over is dropped and counted (inotify and the
 * tracker's periodic look cover it).
 */
import dbus from 'dbus-next';

export interface SystemdFollowOptions {
  /** The bus to listen on; default the system bus (DBUS_SYSTEM_BUS_ADDRESS, else /run/dbus/system_bus_socket). */
  readonly busAddress?: string;
  /** A cgroup path systemd named (relative to the cgroup2 root, '' never). */
  readonly onCgroup: (path: string) => void;
  /** The bus went away: the part stops and the daemon starts it again. */
  readonly onLost: (error: Error) => void;
  readonly maxPending?: number;
  /** How long to wait for the bus and for systemd's Subscribe; default 5000 ms. */
  readonly timeoutMs?: number;
}

export interface SystemdFollow {
  counters(): { readonly signals: number; readonly lookups: number; readonly dropped: number };
  close(): void;
}

const SYSTEMD = 'org.freedesktop.systemd1';
const MAX_KNOWN_UNITS = 4096;
const MANAGER = 'org.freedesktop.systemd1.Manager';
/** The interface that carries ControlGroup, by unit type. */
const CGROUP_INTERFACE: Readonly<Record<string, string>> = {
  service: 'org.freedesktop.systemd1.Service',
  scope: 'org.freedesktop.systemd1.Scope',
  slice: 'org.freedesktop.systemd1.Slice',
  socket: 'org.freedesktop.systemd1.Socket',
  mount: 'org.freedesktop.systemd1.Mount',
  swap: 'org.freedesktop.systemd1.Swap',
};

export async function followSystemd(options: SystemdFollowOptions): Promise<SystemdFollow> {
  const address = options.busAddress ?? process.env['DBUS_SYSTEM_BUS_ADDRESS'] ?? 'unix:path=/run/dbus/system_bus_socket';
  const bus = dbus.sessionBus({ busAddress: address });
  const timeoutMs = options.timeoutMs ?? 5000;
  const maxPending = options.maxPending ?? 64;
  let closed = false;
  const count = { signals: 0, lookups: 0, dropped: 0 };
  // Until it is set up, a bus that fails (no socket: a machine without D-Bus) fails the start; only after, is it lost.
  let setUp = false;
  let failSetUp: (error: Error) => void = () => undefined;
  const setUpFailed = new Promise<never>((_, reject) => (failSetUp = reject));
  setUpFailed.catch(() => undefined);
  const lost = (error: Error): void => {
    if (closed) return;
    if (!setUp) {
      failSetUp(error);
      return;
    }
    closed = true;
    options.onLost(error);
  };
  const call = (member: string, iface: string, path: string, signature = '', body: unknown[] = [], destination = SYSTEMD): Promise<dbus.Message | null> =>
    bus.call(new dbus.Message({ destination, path, interface: iface, member, signature, body }));
  try {
    await withTimeout(
      Promise.race([
        setUpFailed,
        (async () => {
          bus.on('error', (error: unknown) => lost(error instanceof Error ? error : new Error(String(error))));
          (bus as unknown as { _connection: NodeJS.EventEmitter })._connection.on('end', () => lost(new Error(`the bus at ${address} closed`)));
          await call(
            'AddMatch',
            'org.freedesktop.DBus',
            '/org/freedesktop/DBus',
            's',
            [`type='signal',sender='${SYSTEMD}',interface='${MANAGER}'`],
            'org.freedesktop.DBus',
          );
          // systemd sends UnitNew and UnitRemoved only to clients that subscribed.
          await call('Subscribe', MANAGER, '/org/freedesktop/systemd1');
        })(),
      ]),
      timeoutMs,
      `systemd did not answer on ${address} within ${timeoutMs} ms`,
    );
    setUp = true;
  } catch (error) {
    closed = true;
    bus.disconnect();
    throw error;
  }

  const pending = new Set<string>();
  /** Each unit's cgroup as last read: UnitRemoved names a unit whose property can no longer be read. Bounded; when full it starts again. */
  const known = new Map<string, string>();
  /** The unit's cgroup, by its object path, or first its object path by name (JobRemoved names only the unit). */
  const lookUp = (unit: string, objectPath: string | undefined): void => {
    const iface = CGROUP_INTERFACE[unit.slice(unit.lastIndexOf('.') + 1)];
    if (iface === undefined || closed || pending.has(unit)) return;
    if (pending.size >= maxPending) {
      count.dropped++;
      return;
    }
    pending.add(unit);
    count.lookups++;
    (async () => {
      const path: unknown = objectPath ?? ((await call('GetUnit', MANAGER, '/org/freedesktop/systemd1', 's', [unit]))?.body[0] as unknown);
      if (typeof path !== 'string') return;
      const reply = await call('Get', 'org.freedesktop.DBus.Properties', path, 'ss', [iface, 'ControlGroup']);
      const variant = reply?.body[0] as { value?: unknown } | undefined;
      const cgroup = typeof variant?.value === 'string' ? variant.value.replace(/^\/+|\/+$/g, '') : '';
      // eslint-disable-next-line @typescript-eslint/no-unnecessary-condition -- closed meanwhile, while the answer was awaited
      if (cgroup === '' || closed) return;
      if (known.size >= MAX_KNOWN_UNITS) known.clear();
      known.set(unit, cgroup);
      options.onCgroup(cgroup);
    })()
      // A unit gone before its property was read: its cgroup is gone too, which inotify and the periodic look tell.
      .catch(() => undefined)
      .finally(() => pending.delete(unit));
  };

  bus.on('message', (message: dbus.Message) => {
    if (message.type !== dbus.MessageType.SIGNAL || message.interface !== MANAGER) return;
    const body = message.body as unknown[];
    count.signals++;
    // UnitNew/UnitRemoved (s id, o path); JobRemoved (u id, o job, s unit, s result): the unit's object path is asked for by name.
    if (message.member === 'UnitRemoved' && typeof body[0] === 'string') {
      const cgroup = known.get(body[0]);
      known.delete(body[0]);
      if (cgroup !== undefined) options.onCgroup(cgroup);
    } else if (message.member === 'UnitNew' && typeof body[0] === 'string' && typeof body[1] === 'string') {
      lookUp(body[0], body[1]);
    } else if (message.member === 'JobRemoved' && typeof body[2] === 'string') {
      lookUp(body[2], undefined);
    }
  });

  return {
    counters: () => ({ ...count }),
    close() {
      if (closed) return;
      closed = true;
      bus.disconnect();
    },
  };
}

function withTimeout<T>(work: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    work,
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(message)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
