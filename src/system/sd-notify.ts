/**
 * systemd's notify protocol (`Type=notify`): state lines such as READY=1 and
 * STATUS=… sent as one datagram to $NOTIFY_SOCKET.
 *
 * Node has no unix datagram sockets, so the datagram is sent by libsystemd's
 * own `sd_notify` through koffi rather than by libc's socket calls: it is the
 * reference implementation of the protocol, so it knows the address forms
 * ("/path", "@abstract", and on newer systemd "vsock:…"), sends the
 * credentials systemd checks, and follows whatever the protocol becomes —
 * none of which egressd then has to re-implement and keep up with.
 * libsystemd.so.0 is on every host that runs systemd, and where it is
 * missing nobody listens: the library is loaded only when NOTIFY_SOCKET is
 * set, at the first message.
 *
 * A failed notification never reaches the daemon: it is logged once (the
 * service manager will report the missing READY itself) and later ones are
 * dropped quietly.
 */
import { createRequire } from 'node:module';
import { EgressError, ErrorCode } from '../errors.js';

export const LIBSYSTEMD = 'libsystemd.so.0';

/** One notification: the fields systemd reads, in the order they are sent. */
export interface NotifyFields {
  readonly ready?: boolean;
  readonly reloading?: boolean;
  readonly stopping?: boolean;
  readonly watchdog?: boolean;
  /** CLOCK_MONOTONIC in µs; systemd ≥ 253 wants it with RELOADING=1 (252 ignores it). */
  readonly monotonicUsec?: bigint;
  /** Shown by `systemctl status`; one line. */
  readonly status?: string;
}

/** The message systemd receives: KEY=VALUE lines, newline-separated. */
export function notifyMessage(fields: NotifyFields): string {
  const lines: string[] = [];
  if (fields.reloading) lines.push('RELOADING=1');
  if (fields.monotonicUsec !== undefined) lines.push(`MONOTONIC_USEC=${fields.monotonicUsec}`);
  if (fields.ready) lines.push('READY=1');
  if (fields.stopping) lines.push('STOPPING=1');
  if (fields.watchdog) lines.push('WATCHDOG=1');
  // A newline would start another assignment systemd parses (a STATUS naming "READY=1" on a line of its own must not make it so).
  if (fields.status !== undefined) lines.push(`STATUS=${fields.status.replace(/[\r\n]+/g, ' ')}`);
  return lines.join('\n');
}

/** Now, on the clock systemd compares MONOTONIC_USEC with (libuv's hrtime is CLOCK_MONOTONIC on Linux). */
export function monotonicUsec(): bigint {
  return process.hrtime.bigint() / 1000n;
}

/**
 * How often to send WATCHDOG=1, in ms: half of WATCHDOG_USEC, as sd_watchdog_enabled(3)
 * advises; undefined when systemd set no watchdog, or set it for another process (WATCHDOG_PID).
 */
export function watchdogIntervalMs(env: NodeJS.ProcessEnv, pid: number): number | undefined {
  const usec = env['WATCHDOG_USEC'];
  if (usec === undefined || !/^\d+$/.test(usec)) return undefined;
  const forPid = env['WATCHDOG_PID'];
  if (forPid !== undefined && forPid !== String(pid)) return undefined;
  const ms = Number(BigInt(usec) / 2000n);
  return ms > 0 ? ms : undefined;
}

/** Sends one message; returns what sd_notify returned (> 0 sent, 0 nobody listens, < 0 -errno). */
export type SendNotify = (message: string) => number;

/** libsystemd's sd_notify, bound through koffi. Throws EGD_IO when koffi or the library cannot be loaded. */
export function loadSdNotify(path: string = LIBSYSTEMD): SendNotify {
  let koffi: typeof import('koffi');
  try {
    // Loaded here, not imported at the top: a koffi without a build for this platform is an error of this call, not of every importer.
    koffi = createRequire(import.meta.url)('koffi') as typeof import('koffi');
    const lib = koffi.load(path);
    const sdNotify = lib.func('sd_notify', 'int', ['int', 'const char *']) as (unsetEnvironment: number, state: string) => number;
    // unset_environment 0: the daemon notifies for its whole life, not once.
    return (message) => sdNotify(0, message);
  } catch (cause) {
    throw new EgressError(ErrorCode.Io, `sd_notify: cannot load ${path}: ${(cause as Error).message}`, { cause });
  }
}

export interface Notifier {
  /** False when there is no NOTIFY_SOCKET: every call is a no-op. */
  readonly enabled: boolean;
  send(fields: NotifyFields): void;
  /** Sends WATCHDOG=1 every half WATCHDOG_USEC, if systemd asked for it; returns the interval (ms) or undefined. */
  startWatchdog(): number | undefined;
  close(): void;
}

export interface NotifierOptions {
  /** Default process.env, which is the only one libsystemd's sd_notify reads: another is for a fake `load`. */
  readonly env?: NodeJS.ProcessEnv;
  readonly pid?: number;
  /** Called once, for the first failure; later failures are dropped. */
  readonly failed: (reason: string) => void;
  /** The transport (tests give a fake); default libsystemd's sd_notify. */
  readonly load?: () => SendNotify;
}

export function openNotifier(options: NotifierOptions): Notifier {
  const env = options.env ?? process.env;
  const enabled = (env['NOTIFY_SOCKET'] ?? '') !== '';
  let send: SendNotify | undefined;
  let broken = false;
  let watchdog: NodeJS.Timeout | undefined;
  const fail = (reason: string): void => {
    if (broken) return;
    broken = true;
    options.failed(reason);
  };
  const notifier: Notifier = {
    enabled,
    send(fields) {
      if (!enabled || broken) return;
      try {
        send ??= (options.load ?? loadSdNotify)();
        const sent = send(notifyMessage(fields));
        if (sent < 0) fail(`sd_notify failed: errno ${-sent}`);
        else if (sent === 0) fail('sd_notify found no NOTIFY_SOCKET');
      } catch (error) {
        fail((error as Error).message);
      }
    },
    startWatchdog() {
      if (!enabled || watchdog) return undefined;
      const every = watchdogIntervalMs(env, options.pid ?? process.pid);
      if (every === undefined) return undefined;
      notifier.send({ watchdog: true });
      // Pings prove the event loop turns; unref'd, they never keep a stopping daemon alive.
      watchdog = setInterval(() => notifier.send({ watchdog: true }), every).unref();
      return every;
    },
    close() {
      clearInterval(watchdog);
      watchdog = undefined;
    },
  };
  return notifier;
}
