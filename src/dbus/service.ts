/**
 * egressd on the system bus: org.egressd.Firewall1 at /org/egressd/Firewall1.
 *
 *   Status() → a{sv}                       anyone
 *   Reload() → a{sv}                       root, or polkit org.egressd.reload
 *   QueryDenials(a{sv} filter) → aa{sv}    root and members of egressd-audit
 *   AllowFromDenial(t id, s scope) → a{sv} root, or polkit org.egressd.allow-from-denial (the caller's own records)
 *   Allow(s app, as to, a{sv} options, s scope) → a{sv}   root, or polkit org.egressd.allow (egressctl allow --app)
 *   Subscribe(a{sv} options) → a{sv}       anyone: Denied signals of the caller's own uid; {all: true} root and audit only
 *   Unsubscribe()
 *   signal Denied(a{sv} record, t id)      id 0: not (yet) in the store
 *   properties State, PolicyDigest, Lockdown, DeniedEvents, DeniedRecords, LostEvents, StoreDroppedRecords (read-only, anyone)
 *   (StoreDroppedRecords: records read but not stored — the store's worker was behind or failing; they went to the journal)
 *
 * Every decision is taken here from the caller's credentials on the bus
 * (access.ts); the bus policy (systemd/org.egressd.Firewall1.conf) only lets
 * everyone talk to the name and root own it.
 *
 * Denied is never broadcast. A broadcast signal reaches every connection
 * whose match rule asks for it, and a bus policy cannot tell whose uid a
 * record concerns, so a broadcast Denied would tell every local user where
 * everyone else's apps tried to go. Instead an agent calls Subscribe and
 * each record goes as a unicast signal (a destination set) to the
 * subscribers that may see it: those of the record's uid, and root and
 * audit subscribers that asked for all. The bus delivers a unicast message
 * to its destination only (monitoring the system bus is root's). A
 * subscription ends with Unsubscribe or when the subscriber leaves the bus.
 *
 * The method calls are read off the connection directly (addMethodHandler),
 * not through dbus-next's Interface class, whose handlers are not told who
 * called; every reply or error is sent in one place (`answer`).
 */
import dbus from 'dbus-next';
import type { Logger } from 'pino';
import type { DaemonStatus, ReloadOutcome } from '../daemon/part.js';
import type { DenialRecord } from '../denials/record.js';
import { EgressError, ErrorCode, isEgressError } from '../errors.js';
import { nssAccounts, type Accounts } from '../system/nss.js';
import { subordinateOwners } from '../system/subordinate.js';
import { askBus, callerCredentials, DEFAULT_AUDIT_GROUP, roleOf, type Caller, type PolkitAction, type PolkitCheck, type PolkitDetails } from './access.js';
import { allowanceDetails, allowanceFor, DROP_IN, DropIn, manualAllowance, parseScope, type Allowance, type AllowProto } from './allow.js';
import type { DenialCounters, DenialFeed, DenialStore } from './contracts.js';
import { booleanArg, filterFromDbus, integerArg, recordToDbus, stringArg } from './wire.js';

const { Message, Variant } = dbus;
type Message = InstanceType<typeof Message>;

export const BUS_NAME = 'org.egressd.Firewall1';
export const OBJECT_PATH = '/org/egressd/Firewall1';
export const INTERFACE = 'org.egressd.Firewall1';
export const ERROR_PREFIX = 'org.egressd.Firewall1.Error';

/** The D-Bus error name of each failure, in one place: callers match on these names, as the CLI matches on codes. */
export function dbusErrorName(error: unknown): string {
  if (error instanceof ServiceLimit) return `${ERROR_PREFIX}.LimitsExceeded`;
  if (!isEgressError(error)) return `${ERROR_PREFIX}.Failed`;
  switch (error.code) {
    case ErrorCode.AccessDenied:
      return `${ERROR_PREFIX}.AccessDenied`;
    case ErrorCode.InvalidArgument:
      return `${ERROR_PREFIX}.InvalidArgs`;
    case ErrorCode.NotFound:
      return `${ERROR_PREFIX}.NotFound`;
    case ErrorCode.NotAllowable:
      return `${ERROR_PREFIX}.NotAllowable`;
    case ErrorCode.PolicyInvalid:
      return `${ERROR_PREFIX}.PolicyInvalid`;
    default:
      return `${ERROR_PREFIX}.Failed`;
  }
}

/** The error code a D-Bus error name stands for (the client's side of `dbusErrorName`). */
export function codeOfDbusError(name: string): ErrorCode | undefined {
  const table: Record<string, ErrorCode> = {
    [`${ERROR_PREFIX}.AccessDenied`]: ErrorCode.AccessDenied,
    [`${ERROR_PREFIX}.InvalidArgs`]: ErrorCode.InvalidArgument,
    [`${ERROR_PREFIX}.NotFound`]: ErrorCode.NotFound,
    [`${ERROR_PREFIX}.NotAllowable`]: ErrorCode.NotAllowable,
    [`${ERROR_PREFIX}.PolicyInvalid`]: ErrorCode.PolicyInvalid,
  };
  return table[name];
}

class ServiceLimit extends Error {}

export interface ServiceDeps {
  /** The daemon's state (PartContext.status). */
  readonly status: () => DaemonStatus;
  /** Re-validate and re-apply (PartContext.reload). */
  readonly reload: (why: string) => Promise<ReloadOutcome>;
  /** Where 80-allowed.yaml goes. */
  readonly policyDir: string;
  /** Absent: QueryDenials and AllowFromDenial answer Failed ("no denial store"). */
  readonly store?: DenialStore | undefined;
  /** Absent: no Denied signals, counters 0. */
  readonly feed?: DenialFeed | undefined;
  readonly log: Logger;
  /** Default: the machine's system bus (DBUS_SYSTEM_BUS_ADDRESS, else /run/dbus/system_bus_socket). */
  readonly busAddress?: string;
  readonly auditGroup?: string;
  /** Default: NSS (getpwuid_r, getgrouplist). */
  readonly accounts?: Accounts;
  /** Default: none — only root may change. The part passes pkcheck when polkit is installed. */
  readonly polkit?: PolkitCheck;
  readonly now?: () => number;
  /**
   * Subscriptions at most per uid and in all (a user cannot make the daemon
   * hold unbounded state). A user's subordinate uids (/etc/subuid: what its
   * user namespaces send as) count as one uid, its range's owner; and
   * `reservedSubscriptions` of the total are kept for root and audit.
   */
  readonly maxSubscriptionsPerUid?: number;
  readonly maxSubscriptions?: number;
  readonly reservedSubscriptions?: number;
  /** Default /etc/subuid. */
  readonly subuidFile?: string;
  /** polkit checks (pkcheck processes) running at most, in all and per uid; past it a call is refused with LimitsExceeded. */
  readonly maxPolkitChecks?: number;
  readonly maxPolkitChecksPerUid?: number;
  /** How long a caller's role (root, audit member, user: NSS lookups) is reused for the same uid. */
  readonly roleCacheMs?: number;
  /** Denied signals waiting for their store id at most; past it they are dropped and counted. */
  readonly maxPendingSignals?: number;
  /** How long a record waits for its store id before its signal goes (one store flush per tick). */
  readonly signalDelayMs?: number;
  /** Denied signals sent (and records taken) per tick at most; the rest go in the next turn of the loop. Default 256. */
  readonly maxSignalsPerTick?: number;
}

export interface FirewallService {
  /** Settles when the bus connection is lost. */
  readonly stopped: Promise<unknown>;
  close(): Promise<void>;
  describe(): string;
  /** For Status and tests. */
  stats(): { subscribers: number; signalsSent: number; signalsDropped: number };
  /** Runs DropIn.prune now (the part calls it on a timer). */
  readonly dropIn: DropIn;
}

const INTROSPECTION = `<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">
<node>
  <interface name="${INTERFACE}">
    <method name="Status"><arg name="status" type="a{sv}" direction="out"/></method>
    <method name="Reload"><arg name="outcome" type="a{sv}" direction="out"/></method>
    <method name="QueryDenials"><arg name="filter" type="a{sv}" direction="in"/><arg name="records" type="aa{sv}" direction="out"/></method>
    <method name="AllowFromDenial"><arg name="record_id" type="t" direction="in"/><arg name="scope" type="s" direction="in"/><arg name="result" type="a{sv}" direction="out"/></method>
    <method name="Allow"><arg name="app" type="s" direction="in"/><arg name="to" type="as" direction="in"/><arg name="options" type="a{sv}" direction="in"/><arg name="scope" type="s" direction="in"/><arg name="result" type="a{sv}" direction="out"/></method>
    <method name="Subscribe"><arg name="options" type="a{sv}" direction="in"/><arg name="subscription" type="a{sv}" direction="out"/></method>
    <method name="Unsubscribe"/>
    <signal name="Denied"><arg name="record" type="a{sv}"/><arg name="record_id" type="t"/></signal>
    <property name="State" type="s" access="read"/>
    <property name="PolicyDigest" type="s" access="read"/>
    <property name="Lockdown" type="b" access="read"/>
    <property name="DeniedEvents" type="t" access="read"/>
    <property name="DeniedRecords" type="t" access="read"/>
    <property name="LostEvents" type="t" access="read"/>
    <property name="StoreDroppedRecords" type="t" access="read"/>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get"><arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="v" direction="out"/></method>
    <method name="GetAll"><arg type="s" direction="in"/><arg type="a{sv}" direction="out"/></method>
    <method name="Set"><arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="v" direction="in"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg type="s" direction="out"/></method>
  </interface>
</node>`;

/** Each method's argument signature: anything else is refused before it is read. */
const SIGNATURES: Readonly<Record<string, string>> = {
  Status: '',
  Reload: '',
  QueryDenials: 'a{sv}',
  AllowFromDenial: 'ts',
  Allow: 'sasa{sv}s',
  Subscribe: 'a{sv}',
  Unsubscribe: '',
};

const NO_COUNTERS: DenialCounters = { events: 0, records: 0, lost: 0, enobufs: 0, sequenceGaps: 0, unparsed: 0 };

interface Subscription {
  readonly uid: number;
  readonly all: boolean;
  /** Whose the uid is for the limits: "uid:N", or "subuid:OWNER" for a uid in OWNER's subordinate range. */
  readonly holder: string;
  readonly privileged: boolean;
}

/** A reply: its signature and body. */
type Reply = readonly [string, unknown[]];

function waitConnected(bus: dbus.MessageBus): Promise<void> {
  return new Promise((resolve, reject) => {
    bus.once('connect', () => resolve());
    bus.once('error', (error: unknown) => reject(error instanceof Error ? error : new Error(String(error))));
  });
}

export function connectBus(busAddress: string | undefined): dbus.MessageBus {
  return busAddress === undefined ? dbus.systemBus() : dbus.sessionBus({ busAddress });
}

export async function startFirewallService(deps: ServiceDeps): Promise<FirewallService> {
  const log = deps.log;
  const now = deps.now ?? Date.now;
  const accounts = deps.accounts ?? nssAccounts();
  const auditGroup = deps.auditGroup ?? DEFAULT_AUDIT_GROUP;
  const perUid = deps.maxSubscriptionsPerUid ?? 8;
  const maxSubs = deps.maxSubscriptions ?? 1024;
  const reserved = Math.min(maxSubs, deps.reservedSubscriptions ?? 64);
  const subuidFile = deps.subuidFile ?? '/etc/subuid';
  const maxPending = deps.maxPendingSignals ?? 4096;
  const delay = deps.signalDelayMs ?? 100;
  const dropIn = new DropIn(deps.policyDir, deps.reload);
  const maxPolkit = deps.maxPolkitChecks ?? 16;
  const maxPolkitPerUid = deps.maxPolkitChecksPerUid ?? 2;
  const roleCacheMs = deps.roleCacheMs ?? 5000;

  const bus = connectBus(deps.busAddress);
  try {
    await waitConnected(bus);
  } catch (error) {
    bus.disconnect();
    throw new EgressError(ErrorCode.DaemonUnavailable, `cannot connect to the system bus: ${(error as Error).message}`, { cause: error });
  }
  let closing = false;
  const stopped = new Promise<unknown>((resolve) => {
    bus.on('error', (error: unknown) => {
      if (!closing) log.error({ event: 'dbus-error', err: error }, 'D-Bus connection failed');
      resolve(error);
    });
    (bus as unknown as { _connection: NodeJS.EventEmitter })._connection.on('end', () => resolve(new Error('the bus closed the connection')));
  });

  const subscriptions = new Map<string, Subscription>();
  /** Senders of Subscribe calls being answered (how many of each), and those of them that left the bus meanwhile. */
  const subscribing = new Map<string, number>();
  const left = new Set<string>();
  let signalsSent = 0;
  let signalsDropped = 0;
  let pending: DenialRecord[] = [];
  let timer: NodeJS.Timeout | undefined;

  const counters = () => deps.feed?.counters() ?? NO_COUNTERS;

  // NSS lookups are synchronous (they may ask LDAP): a caller's role is looked up once per uid for roleCacheMs, not per call.
  const roles = new Map<number, { readonly role: Caller['role']; readonly name: string | undefined; readonly at: number }>();
  function roleFor(uid: number): { role: Caller['role']; name: string | undefined } {
    const t = now();
    const cached = roles.get(uid);
    if (cached && t - cached.at >= 0 && t - cached.at < roleCacheMs) return cached;
    // Many uids (a user's subuids): the map is emptied rather than allowed to grow.
    if (roles.size >= 4096) roles.clear();
    const found = { ...roleOf(uid, accounts, auditGroup), at: t };
    roles.set(uid, found);
    return found;
  }

  // The subordinate ranges, read again at most every roleCacheMs.
  const subuidOwner = subordinateOwners({ file: subuidFile, maxAgeMs: roleCacheMs, now });
  function holderOf(uid: number): string {
    const owner = subuidOwner(uid);
    return owner === undefined ? `uid:${uid}` : `subuid:${owner}`;
  }

  /** Whether a unique name is still on the bus (it may have left while its call was being answered). */
  async function stillConnected(sender: string): Promise<boolean> {
    try {
      return (await askBus(bus, 'GetNameOwner', sender)) === sender;
    } catch {
      return false;
    }
  }

  async function caller(sender: string): Promise<Caller> {
    const { uid, pid } = await callerCredentials(bus, sender);
    const { role, name } = roleFor(uid);
    return { sender, uid, pid, role, name };
  }

  /** Whether anything could authorize the caller: without polkit only root may change, and the others are refused before their arguments are read. */
  function mayAsk(who: Caller): boolean {
    return who.role === 'root' || deps.polkit !== undefined;
  }

  // Each polkit check is a pkcheck process that may wait for a person: bounded in all and per user, a user's subordinate uids counting as its own.
  const polkitRunning = new Map<string, number>();
  let polkitTotal = 0;
  async function mayChange(who: Caller, action: PolkitAction, details: PolkitDetails = {}): Promise<boolean> {
    if (who.role === 'root') return true;
    if (!deps.polkit) return false;
    const holder = holderOf(who.uid);
    const mine = polkitRunning.get(holder) ?? 0;
    if (mine >= maxPolkitPerUid || polkitTotal >= maxPolkit) {
      log.warn({ event: 'dbus-polkit-limit', uid: who.uid, running: polkitTotal }, 'authorization checks at their limit; call refused');
      throw new ServiceLimit(`too many authorization checks in progress (at most ${maxPolkitPerUid} per user, ${maxPolkit} in all); try again`);
    }
    polkitRunning.set(holder, mine + 1);
    polkitTotal += 1;
    try {
      return await deps.polkit(who.sender, action, details);
    } finally {
      polkitTotal -= 1;
      const left = (polkitRunning.get(holder) ?? 1) - 1;
      if (left > 0) polkitRunning.set(holder, left);
      else polkitRunning.delete(holder);
    }
  }

  function refuse(who: Caller, what: string): EgressError {
    log.warn({ event: 'dbus-refused', uid: who.uid, pid: who.pid, what }, 'D-Bus call refused');
    return new EgressError(ErrorCode.AccessDenied, `${what}: not allowed for uid ${who.uid}`);
  }

  function store(): DenialStore {
    if (!deps.store) throw new EgressError(ErrorCode.Io, 'no denial store is open');
    return deps.store;
  }

  /** Records read but not stored (the store's worker behind by its bound, or failing), and their packets: losses, told like the reader's. */
  function storeDropped(): { records: number; events: number } {
    const c = deps.store?.counters();
    return c ? { records: c.dropped + c.failed, events: c.droppedEvents + c.failedEvents } : { records: 0, events: 0 };
  }

  function statusDict(): Record<string, InstanceType<typeof Variant>> {
    const s = deps.status();
    const c = counters();
    // The one line of updates over Tor (the daemon's tor part): "updates: over Tor (bootstrapped 100 %)", "updates: blocked — …", "updates: direct …".
    const updates = s.parts.find((p) => p.name === 'tor')?.detail;
    return {
      state: new Variant('s', s.state),
      ...(updates !== undefined ? { updates: new Variant('s', updates) } : {}),
      ...(s.digest !== undefined ? { digest: new Variant('s', s.digest) } : {}),
      lockdown: new Variant('b', s.lockdown),
      parts: new Variant(
        'a(sssu)',
        s.parts.map((p) => [p.name, p.state, p.detail ?? '', p.restarts]),
      ),
      events: new Variant('t', c.events),
      records: new Variant('t', c.records),
      lost: new Variant('t', c.lost),
      enobufs: new Variant('t', c.enobufs),
      sequenceGaps: new Variant('t', c.sequenceGaps),
      unparsed: new Variant('t', c.unparsed),
      subscribers: new Variant('u', subscriptions.size),
      signalsDropped: new Variant('t', signalsDropped),
      storeDropped: new Variant('t', storeDropped().records),
      storeDroppedEvents: new Variant('t', storeDropped().events),
    };
  }

  function properties(): Record<string, InstanceType<typeof Variant>> {
    const s = deps.status();
    const c = counters();
    return {
      State: new Variant('s', s.state),
      PolicyDigest: new Variant('s', s.digest ?? ''),
      Lockdown: new Variant('b', s.lockdown),
      DeniedEvents: new Variant('t', c.events),
      DeniedRecords: new Variant('t', c.records),
      LostEvents: new Variant('t', c.lost),
      StoreDroppedRecords: new Variant('t', storeDropped().records),
    };
  }

  async function allowed(entry: Allowance): Promise<Reply> {
    const { digest } = await dropIn.add(entry);
    return [
      'a{sv}',
      [
        {
          file: new Variant('s', DROP_IN),
          app: new Variant('s', entry.app),
          to: new Variant('s', entry.allow.join(', ')),
          until: new Variant('s', entry.until ?? 'always'),
          digest: new Variant('s', digest),
        },
      ],
    ];
  }

  async function call(msg: Message): Promise<Reply> {
    // dbus-next's types promise a body and a signature; a call without arguments has neither.
    const args = (msg.body as unknown[] | undefined) ?? [];
    switch (msg.member) {
      case 'Status':
        return ['a{sv}', [statusDict()]];
      case 'Reload': {
        const who = await caller(msg.sender);
        if (!(await mayChange(who, 'org.egressd.reload'))) throw refuse(who, 'Reload');
        log.info({ event: 'dbus-reload', uid: who.uid, pid: who.pid }, 'reload asked over D-Bus');
        const outcome = await deps.reload(`D-Bus Reload by uid ${who.uid}`);
        if (!outcome.applied) {
          throw new EgressError(
            outcome.code === ErrorCode.PolicyInvalid ? ErrorCode.PolicyInvalid : ErrorCode.NftApply,
            'the policy was not applied; the one in force stays',
            {
              details: outcome.errors,
            },
          );
        }
        return ['a{sv}', [{ applied: new Variant('b', true), digest: new Variant('s', outcome.digest) }]];
      }
      case 'QueryDenials': {
        const who = await caller(msg.sender);
        if (who.role === 'user') throw refuse(who, 'QueryDenials');
        const filter = filterFromDbus(args[0] as Record<string, unknown>);
        return ['aa{sv}', [(await store().query(filter)).map(recordToDbus)]];
      }
      case 'AllowFromDenial': {
        const who = await caller(msg.sender);
        // Who first, where nothing could authorize the caller: it learns nothing, not even whether its arguments were good.
        if (!mayAsk(who)) throw refuse(who, 'AllowFromDenial');
        const id = Number(args[0]);
        const scope = parseScope(args[1] as string);
        const record = Number.isSafeInteger(id) && id > 0 ? await store().get(id) : undefined;
        // Not found and not yours answer alike: a record id says nothing about other users' records.
        // Before polkit: its dialog names what this record would open, and nobody is asked about a call that cannot succeed.
        if (!record || (who.role !== 'root' && record.uid !== who.uid)) throw new EgressError(ErrorCode.NotFound, `no denial record ${String(args[0])}`);
        const entry = allowanceFor(record, { uid: who.uid, name: who.name }, now(), scope);
        if (!(await mayChange(who, 'org.egressd.allow-from-denial', allowanceDetails(entry, record)))) throw refuse(who, 'AllowFromDenial');
        log.info(
          { event: 'dbus-allow', uid: who.uid, pid: who.pid, record: id, app: entry.app, to: entry.allow, until: entry.until ?? 'always' },
          'allow from a denial',
        );
        return allowed(entry);
      }
      case 'Allow': {
        const who = await caller(msg.sender);
        if (!mayAsk(who)) throw refuse(who, 'Allow');
        const [app, to, options, scopeText] = args as [string, string[], Record<string, unknown>, string];
        const scope = parseScope(scopeText);
        if (app.length === 0 || app.length > 64) throw new EgressError(ErrorCode.InvalidArgument, 'app: must be 1–64 characters');
        if (to.length === 0 || to.length > 64 || to.some((d) => d.length === 0 || d.length > 255))
          throw new EgressError(ErrorCode.InvalidArgument, 'to: 1–64 destinations of 1–255 characters');
        let ports: number[] | undefined;
        let proto: AllowProto | undefined;
        for (const [key, value] of Object.entries(options)) {
          if (key === 'ports') {
            const v = value as { signature?: string; value?: unknown };
            if (v.signature !== 'aq' && v.signature !== 'au') throw new EgressError(ErrorCode.InvalidArgument, 'ports: expected a list of ports (aq)');
            ports = (v.value as number[]).map((p) => integerArg('ports', new Variant('u', p), 1, 65535));
          } else if (key === 'proto') {
            const p = stringArg('proto', value);
            if (p !== 'tcp' && p !== 'udp' && p !== 'icmp') throw new EgressError(ErrorCode.InvalidArgument, 'proto: tcp, udp or icmp');
            proto = p;
          } else throw new EgressError(ErrorCode.InvalidArgument, `unknown option "${key.slice(0, 64)}" (known: ports, proto)`);
        }
        const entry = manualAllowance(app, to, { ...(ports ? { ports } : {}), ...(proto ? { proto } : {}) }, { uid: who.uid, name: who.name }, now(), scope);
        if (!(await mayChange(who, 'org.egressd.allow', allowanceDetails(entry)))) throw refuse(who, 'Allow');
        log.info(
          { event: 'dbus-allow', uid: who.uid, pid: who.pid, app: entry.app, to: entry.allow, until: entry.until ?? 'always' },
          'allow asked over D-Bus',
        );
        return allowed(entry);
      }
      case 'Subscribe': {
        const who = await caller(msg.sender);
        const options = args[0] as Record<string, unknown>;
        let all = false;
        for (const [key, value] of Object.entries(options)) {
          if (key === 'all') all = booleanArg(key, value);
          else throw new EgressError(ErrorCode.InvalidArgument, `unknown option "${key.slice(0, 64)}" (known: all)`);
        }
        if (all && who.role === 'user') throw refuse(who, 'Subscribe {all: true}');
        // Its NameOwnerChanged may have come while this call awaited the bus: then it is not added (it would never be removed).
        if (!(await stillConnected(msg.sender)) || left.has(msg.sender)) throw new EgressError(ErrorCode.InvalidArgument, 'the subscriber left the bus');
        const privileged = who.role !== 'user';
        const holder = holderOf(who.uid);
        if (!subscriptions.has(msg.sender)) {
          const held = [...subscriptions.values()];
          const mine = held.filter((s) => s.holder === holder).length;
          const users = held.filter((s) => !s.privileged).length;
          if (mine >= perUid) throw new ServiceLimit(`too many subscriptions (at most ${perUid} per user)`);
          if (subscriptions.size >= maxSubs || (!privileged && users >= maxSubs - reserved))
            throw new ServiceLimit(`too many subscriptions (at most ${maxSubs} in all, ${reserved} of them kept for root and ${auditGroup})`);
        }
        subscriptions.set(msg.sender, { uid: who.uid, all, holder, privileged });
        return ['a{sv}', [{ uid: new Variant('u', who.uid), all: new Variant('b', all) }]];
      }
      case 'Unsubscribe':
        subscriptions.delete(msg.sender);
        return ['', []];
      default:
        throw new EgressError(ErrorCode.InvalidArgument, `no method ${msg.member}`);
    }
  }

  function answer(msg: Message, work: () => Promise<Reply> | Reply): void {
    Promise.resolve()
      .then(work)
      .then(
        ([signature, body]) => bus.send(Message.newMethodReturn(msg, signature, body)),
        (error: unknown) => {
          if (!isEgressError(error) && !(error instanceof ServiceLimit))
            log.error({ event: 'dbus-call-failed', member: msg.member, err: error }, 'D-Bus call failed');
          const details = isEgressError(error) && error.details.length > 0 ? `\n${error.details.join('\n')}` : '';
          bus.send(Message.newError(msg as never, dbusErrorName(error), `${(error as Error).message}${details}`));
        },
      )
      .catch((error: unknown) => log.error({ event: 'dbus-reply-failed', err: error }, 'could not send a D-Bus reply'));
  }

  const invalidArgs = (msg: Message, text: string) => answer(msg, () => Promise.reject(new EgressError(ErrorCode.InvalidArgument, text)));

  const handler = (msg: Message): boolean => {
    if (msg.path !== OBJECT_PATH) return false;
    const signature = (msg.signature as string | undefined) ?? '';
    if (msg.interface === 'org.freedesktop.DBus.Introspectable' && msg.member === 'Introspect') {
      answer(msg, () => ['s', [INTROSPECTION]]);
      return true;
    }
    if (msg.interface === 'org.freedesktop.DBus.Properties') {
      const props = () => properties();
      if (msg.member === 'GetAll' && signature === 's') answer(msg, () => ['a{sv}', [msg.body[0] === INTERFACE ? props() : {}]]);
      else if (msg.member === 'Get' && signature === 'ss') {
        answer(msg, () => {
          const value = msg.body[0] === INTERFACE ? props()[msg.body[1] as string] : undefined;
          if (!value) throw new EgressError(ErrorCode.InvalidArgument, `no property ${String(msg.body[0])}.${String(msg.body[1])}`);
          return ['v', [value]];
        });
      } else if (msg.member === 'Set') answer(msg, () => Promise.reject(new EgressError(ErrorCode.AccessDenied, 'the properties are read-only')));
      else invalidArgs(msg, `Properties.${msg.member} takes other arguments`);
      return true;
    }
    const iface = msg.interface as string | undefined;
    if (iface !== undefined && iface !== INTERFACE) return false;
    const expected = SIGNATURES[msg.member];
    if (expected === undefined) return false;
    if (signature !== expected) {
      invalidArgs(msg, `${msg.member} takes (${expected}), not (${signature})`);
      return true;
    }
    if (msg.member !== 'Subscribe') {
      answer(msg, () => call(msg));
      return true;
    }
    // Marked now, before any await: a NameOwnerChanged processed while the call runs is then seen.
    subscribing.set(msg.sender, (subscribing.get(msg.sender) ?? 0) + 1);
    answer(msg, () =>
      call(msg).finally(() => {
        const n = (subscribing.get(msg.sender) ?? 1) - 1;
        if (n > 0) subscribing.set(msg.sender, n);
        else {
          subscribing.delete(msg.sender);
          left.delete(msg.sender);
        }
      }),
    );
    return true;
  };
  bus.addMethodHandler(handler);

  // A subscriber that leaves the bus is forgotten, so its unique name (never reused) holds nothing.
  const onMessage = (msg: Message) => {
    if (msg.type === dbus.MessageType.SIGNAL && msg.sender === 'org.freedesktop.DBus' && msg.member === 'NameOwnerChanged') {
      const [name, , owner] = msg.body as [string, string, string];
      if (owner === '' && subscribing.has(name)) left.add(name);
      if (owner === '' && subscriptions.delete(name)) log.info({ event: 'dbus-unsubscribed', name }, 'subscriber left the bus');
    }
  };
  bus.on('message', onMessage);
  await askBus(bus, 'AddMatch', "type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged'");

  const reply = await bus.requestName(BUS_NAME, dbus.NameFlag.DO_NOT_QUEUE).catch((error: unknown) => error as Error);
  if (reply !== dbus.RequestNameReply.PRIMARY_OWNER) {
    bus.disconnect();
    const why = reply instanceof Error ? reply.message : 'another process owns it';
    throw new EgressError(ErrorCode.DaemonUnavailable, `cannot own ${BUS_NAME} on the bus: ${why}`);
  }

  /** Waits for the store's worker to write what it holds, so each record of this tick has its row id; a store that fails leaves ids at 0. */
  async function flushStore(): Promise<void> {
    try {
      await deps.store?.flush();
    } catch (error) {
      log.warn({ event: 'dbus-store-id', err: error }, 'denial store ids not read; Denied signals go without them');
    }
  }

  /** The row id the store gave the record (idOf: a map lookup, no query), or 0 without one. */
  function storeId(record: DenialRecord): number {
    try {
      return deps.store?.idOf(record) ?? 0;
    } catch {
      return 0;
    }
  }

  // This runs on the daemon's one thread, beside the resolver: a tick sends at most this many signals (and takes at most as many records), the rest go the next turn.
  const signalsPerTick = deps.maxSignalsPerTick ?? 256;
  async function flushSignals(): Promise<void> {
    if (subscriptions.size === 0) {
      timer = undefined;
      pending = [];
      return;
    }
    // Only the records already handed to the store when the flush was asked for have their ids after it; later ones wait for the next tick's.
    // `timer` stays set meanwhile, so records arriving now do not start a second tick beside this one.
    const ready = pending.length;
    await flushStore();
    timer = undefined;
    if (closing) return;
    // Every record goes to an `all` subscriber only while its user is still root or in the audit group (its role is looked up
    // again once its cache runs out): one taken out of the group stops getting other users' denials within seconds, as the
    // group says for every other call.
    for (const [name, sub] of subscriptions)
      if (sub.all && sub.uid !== 0 && roleFor(sub.uid).role === 'user') {
        subscriptions.delete(name);
        log.info(
          { event: 'dbus-subscription-ended', uid: sub.uid, why: `no longer in ${auditGroup}` },
          `a subscription to every denial ended: uid ${sub.uid} is no longer in ${auditGroup}`,
        );
      }
    let taken = 0;
    let sent = 0;
    while (taken < ready && taken < pending.length && taken < signalsPerTick && sent < signalsPerTick) {
      const record = pending[taken++]!;
      const id = storeId(record);
      const body = [recordToDbus(record), id];
      const ownBody = record.name === undefined || record.nameAskedBy === 'sender' ? body : [recordToDbus(withoutOthersName(record)), id];
      for (const [name, sub] of subscriptions) {
        if (!sub.all && (record.uid === undefined || record.uid !== sub.uid)) continue;
        const signal = Message.newSignal(OBJECT_PATH, INTERFACE, 'Denied', 'a{sv}t', sub.all ? body : ownBody);
        signal.destination = name;
        bus.send(signal);
        signalsSent += 1;
        sent += 1;
      }
    }
    pending.splice(0, taken);
    // The rest in the next turn, not after another delay: they waited theirs.
    if (pending.length > 0) timer = setTimeout(() => void flushSignals(), 0);
  }

  const unsubscribeFeed = deps.feed?.subscribe((record) => {
    if (subscriptions.size === 0) return;
    if (pending.length >= maxPending) {
      signalsDropped += 1;
      return;
    }
    pending.push(record);
    timer ??= setTimeout(() => void flushSignals(), delay);
  });

  log.info({ event: 'dbus-started', name: BUS_NAME, bus: deps.busAddress ?? 'system' }, `D-Bus service ${BUS_NAME} started`);
  return {
    stopped,
    dropIn,
    stats: () => ({ subscribers: subscriptions.size, signalsSent, signalsDropped }),
    describe: () => `D-Bus ${BUS_NAME}, ${subscriptions.size} subscribed`,
    async close() {
      closing = true;
      unsubscribeFeed?.();
      if (timer) clearTimeout(timer);
      bus.removeMethodHandler(handler);
      bus.removeListener('message', onMessage);
      await bus.releaseName(BUS_NAME).catch(() => undefined);
      bus.disconnect();
    },
  };
}

/**
 * A record as its own user's agent gets it: a name only other uids looked
 * up goes. The resolver's memory is root's (its control socket is 0600);
 * a user who sends to an address another user's app talks to (from
 * /proc/net/tcp) and is denied would otherwise read in the alert which
 * name the other user looked up for it. Root and audit subscribers get
 * the record whole, as the store holds it.
 */
function withoutOthersName(record: DenialRecord): DenialRecord {
  return { ...record, name: undefined, nameAskedBy: undefined };
}
