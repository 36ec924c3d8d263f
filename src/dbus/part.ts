/**
 * The D-Bus service as a part of the daemon (src/daemon/part.ts): started
 * once a table is enforced, told nothing by later applies (it reads the
 * daemon's status when asked), closed when egressd stops. It also removes
 * allowed entries whose time is up from 80-allowed.yaml: tidying only, since
 * apply leaves expired entries out and the daemon re-applies at each `until`
 * whether or not this part runs.
 */
import { existsSync } from 'node:fs';
import type { Part, PartContext, PartSpec } from '../daemon/part.js';
import { pkcheckPolkit, type PolkitCheck } from './access.js';
import type { DenialFeed, DenialStore } from './contracts.js';
import { startFirewallService, type FirewallService, type ServiceDeps } from './service.js';

export interface FirewallPartOptions {
  /** The denial store (src/denials/store.ts) the daemon opened; absent: no QueryDenials, no AllowFromDenial. */
  readonly store?: DenialStore;
  /** The denial reader's feed (src/denials/reader.ts); absent: no Denied signals. */
  readonly feed?: DenialFeed;
  /** Default: the system bus. */
  readonly busAddress?: string;
  readonly auditGroup?: string;
  /** 'auto' (default): polkit through pkcheck when /usr/bin/pkcheck exists; false: root only. */
  readonly polkit?: 'auto' | false | PolkitCheck;
  /** The longest wait between two looks at expired entries (a clock change or a hand edit is seen within it). */
  readonly expiryCheckMs?: number;
  readonly now?: () => number;
}

const PKCHECK = '/usr/bin/pkcheck';

export function firewallServicePart(options: FirewallPartOptions = {}): PartSpec {
  return {
    name: 'dbus',
    async start(_inForce, context: PartContext): Promise<Part> {
      const now = options.now ?? Date.now;
      const polkit =
        options.polkit === false ? undefined : typeof options.polkit === 'function' ? options.polkit : existsSync(PKCHECK) ? pkcheckPolkit(PKCHECK) : undefined;
      const deps: ServiceDeps = {
        status: () => context.status(),
        reload: (why) => context.reload(why),
        policyDir: context.policyDir,
        log: context.log,
        now,
        ...(options.store ? { store: options.store } : {}),
        ...(options.feed ? { feed: options.feed } : {}),
        ...(options.busAddress !== undefined ? { busAddress: options.busAddress } : {}),
        ...(options.auditGroup !== undefined ? { auditGroup: options.auditGroup } : {}),
        ...(polkit ? { polkit } : {}),
      };
      // A machine with no system bus at all (a container, a host before dbus.service): the part waits for one, not counted as failing.
      if (options.busAddress === undefined && !systemBusPresent())
        return waitForBus(() => startFirewallService(deps).then((s) => serve(s, context, options, now)), context);
      return serve(await startFirewallService(deps), context, options, now);
    },
  };
}

/** Where a system bus listens when DBUS_SYSTEM_BUS_ADDRESS does not say (dbus-next's default, and its /run twin). */
const SYSTEM_BUS_SOCKETS = ['/run/dbus/system_bus_socket', '/var/run/dbus/system_bus_socket'];
const BUS_POLL_MS = 2000;

function systemBusPresent(): boolean {
  return process.env['DBUS_SYSTEM_BUS_ADDRESS'] !== undefined || SYSTEM_BUS_SOCKETS.some((path) => existsSync(path));
}

/** Looks for the system bus every BUS_POLL_MS and serves once it is there; a failure then is the part's (the daemon restarts it). */
function waitForBus(connect: () => Promise<Part>, context: PartContext): Part {
  context.log.info({ event: 'dbus-no-bus' }, 'no system bus: the D-Bus service starts when one appears');
  let settle: (why: unknown) => void = () => undefined;
  const stopped = new Promise<unknown>((resolve) => (settle = resolve));
  let running: Part | undefined;
  let closed = false;
  const poll = setInterval(() => {
    if (!systemBusPresent()) return;
    clearInterval(poll);
    connect().then((part) => {
      if (closed) return void part.close();
      running = part;
      void part.stopped.then(settle);
    }, settle);
  }, BUS_POLL_MS);
  poll.unref();
  return {
    stopped,
    async update() {},
    describe: () => running?.describe?.() ?? 'D-Bus: no system bus yet',
    async close() {
      closed = true;
      clearInterval(poll);
      await running?.close();
    },
  };
}

/** The service with its expiry of allowed entries: at start, and at each entry's `until`. */
function serve(service: FirewallService, context: PartContext, options: FirewallPartOptions, now: () => number): Part {
  const longest = options.expiryCheckMs ?? 3_600_000;
  let timer: NodeJS.Timeout | undefined;
  let closed = false;
  const expire = async () => {
    timer = undefined;
    let failed = false;
    try {
      const removed = await service.dropIn.prune(now());
      if (removed > 0) context.log.info({ event: 'allow-expired', removed }, `${removed} allowed entries expired and were removed`);
    } catch (error) {
      failed = true;
      context.log.error({ event: 'allow-expiry-failed', err: error }, 'expired allowed entries could not be removed; trying again in a minute');
    }
    if (closed) return;
    let next: number | undefined;
    try {
      next = service.dropIn.nextExpiry();
    } catch {
      next = undefined;
    }
    const wait = failed ? 60_000 : next === undefined ? longest : Math.min(longest, Math.max(1000, next - now()));
    timer = setTimeout(() => void expire(), wait);
    timer.unref();
  };
  // Not awaited: a prune reloads, and a reload waits for the parts being started — this one among them.
  void expire();
  return {
    stopped: service.stopped,
    async update() {},
    describe: () => service.describe(),
    async close() {
      closed = true;
      if (timer) clearTimeout(timer);
      await service.close();
    },
  };
}
