/**
 * A polkit authority of the test's own on the private system bus: the real
 * daemon's real pkcheck asks it (org.freedesktop.PolicyKit1.Authority
 * CheckAuthorization, as polkitd answers it), so the whole path from
 * AllowFromDenial through pkcheck runs, while what polkit decides is the
 * test's: polkitd itself needs logind sessions and the action files
 * installed under /usr/share, which a test must not change on the host.
 * Every question is recorded with the uid the bus says the subject is and
 * the details pkcheck passed (its --detail pairs).
 */
import dbus from 'dbus-next';
import { askBus } from '../../src/dbus/access.js';

const { Message } = dbus;
type Message = InstanceType<typeof Message>;

/** Lets the test's authority own polkit's name and everyone ask it (as polkit's own bus policy does). */
export const POLKIT_BUS_POLICY = `  <policy user="root"><allow own="org.freedesktop.PolicyKit1"/></policy>
  <policy context="default"><allow send_destination="org.freedesktop.PolicyKit1"/></policy>`;

export interface PolkitQuestion {
  readonly action: string;
  readonly uid: number | undefined;
  readonly details: Readonly<Record<string, string>>;
}

export interface PolkitAuthority {
  readonly asked: PolkitQuestion[];
  close(): void;
}

export async function startPolkitAuthority(busAddress: string, decide: (question: PolkitQuestion) => boolean): Promise<PolkitAuthority> {
  const bus = dbus.sessionBus({ busAddress });
  await new Promise((resolve, reject) => {
    bus.once('connect', resolve);
    bus.once('error', reject);
  });
  const asked: PolkitQuestion[] = [];
  const uidOf = async (name: string): Promise<number | undefined> => {
    try {
      return (await askBus(bus, 'GetConnectionUnixUser', name)) as number;
    } catch {
      return undefined;
    }
  };
  bus.addMethodHandler((msg: Message) => {
    if (msg.path !== '/org/freedesktop/PolicyKit1/Authority') return false;
    if (msg.interface === 'org.freedesktop.DBus.Properties' && msg.member === 'GetAll') {
      bus.send(Message.newMethodReturn(msg, 'a{sv}', [{}]));
      return true;
    }
    if (msg.member !== 'CheckAuthorization') return false;
    const [[kind, subject], action, details] = msg.body as [[string, Record<string, { value: unknown }>], string, Record<string, string>];
    const name = kind === 'system-bus-name' ? subject['name']?.value : undefined;
    void (typeof name === 'string' ? uidOf(name) : Promise.resolve(undefined)).then((uid) => {
      const question = { action, uid, details };
      asked.push(question);
      bus.send(Message.newMethodReturn(msg, '(bba{ss})', [[decide(question), false, {}]]));
    });
    return true;
  });
  const owned = await bus.requestName('org.freedesktop.PolicyKit1', 4 /* DO_NOT_QUEUE */);
  if (owned !== 1) throw new Error(`could not own org.freedesktop.PolicyKit1 on the test bus (${String(owned)})`);
  return { asked, close: () => bus.disconnect() };
}
