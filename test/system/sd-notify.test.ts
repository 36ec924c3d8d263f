import { existsSync, readFileSync } from 'node:fs';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ErrorCode } from '../../src/errors.js';
import { loadSdNotify, monotonicUsec, notifyMessage, openNotifier, watchdogIntervalMs, type SendNotify } from '../../src/system/sd-notify.js';
import { openNotifySocket, type NotifySocket } from '../support/notify-socket.js';

describe('notifyMessage', () => {
  it('puts RELOADING=1 and MONOTONIC_USEC first and STATUS last, one assignment a line', () => {
    expect(notifyMessage({ reloading: true, monotonicUsec: 123456789n, status: 're-applying: SIGHUP' })).toBe(
      'RELOADING=1\nMONOTONIC_USEC=123456789\nSTATUS=re-applying: SIGHUP',
    );
    expect(notifyMessage({ ready: true, status: 'enforcing' })).toBe('READY=1\nSTATUS=enforcing');
    expect(notifyMessage({ stopping: true })).toBe('STOPPING=1');
    expect(notifyMessage({ watchdog: true })).toBe('WATCHDOG=1');
  });

  it('keeps STATUS on one line, so a status text cannot assign READY=1', () => {
    expect(notifyMessage({ status: 'policy error\nREADY=1\r\nmore' })).toBe('STATUS=policy error READY=1 more');
  });
});

describe('watchdogIntervalMs', () => {
  it('is half of WATCHDOG_USEC, in ms', () => {
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '30000000' }, 42)).toBe(15_000);
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '42' }, 42)).toBe(15_000);
  });
  it('is undefined without a watchdog, for another pid, or for a value that is not a number', () => {
    expect(watchdogIntervalMs({}, 42)).toBeUndefined();
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '30000000', WATCHDOG_PID: '43' }, 42)).toBeUndefined();
    expect(watchdogIntervalMs({ WATCHDOG_USEC: 'soon' }, 42)).toBeUndefined();
    expect(watchdogIntervalMs({ WATCHDOG_USEC: '1' }, 42)).toBeUndefined();
  });
});

describe('openNotifier', () => {
  afterEach(() => vi.useRealTimers());
  const recording = (result = 1) => {
    const sent: string[] = [];
    const send: SendNotify = (message) => (sent.push(message), result);
    return { sent, load: () => send };
  };

  it('without NOTIFY_SOCKET sends nothing and loads nothing', () => {
    const load = vi.fn(() => recording().load());
    const notifier = openNotifier({ env: {}, load, failed: () => expect.unreachable() });
    notifier.send({ ready: true });
    expect(notifier.enabled).toBe(false);
    expect(notifier.startWatchdog()).toBeUndefined();
    expect(load).not.toHaveBeenCalled();
  });

  it('reports the first failure once and never throws', () => {
    const failures: string[] = [];
    const notifier = openNotifier({ env: { NOTIFY_SOCKET: '/nowhere' }, load: recording(-111).load, failed: (r) => failures.push(r) });
    notifier.send({ ready: true });
    notifier.send({ stopping: true });
    expect(failures).toEqual(['sd_notify failed: errno 111']);
  });

  it('reports a library that does not load, once', () => {
    const failures: string[] = [];
    const notifier = openNotifier({ env: { NOTIFY_SOCKET: '/nowhere' }, load: () => loadSdNotify('libsystemd-absent.so.0'), failed: (r) => failures.push(r) });
    expect(() => notifier.send({ ready: true })).not.toThrow();
    notifier.send({ ready: true });
    expect(failures).toHaveLength(1);
    expect(failures[0]).toContain('libsystemd-absent.so.0');
    expect(() => loadSdNotify('libsystemd-absent.so.0')).toThrow(expect.objectContaining({ code: ErrorCode.Io }));
  });

  it('pings the watchdog at once and every half WATCHDOG_USEC', () => {
    vi.useFakeTimers();
    const { sent, load } = recording();
    const notifier = openNotifier({ env: { NOTIFY_SOCKET: '/run/x', WATCHDOG_USEC: '2000000', WATCHDOG_PID: '7' }, pid: 7, load, failed: () => undefined });
    expect(notifier.startWatchdog()).toBe(1000);
    vi.advanceTimersByTime(2500);
    expect(sent).toEqual(['WATCHDOG=1', 'WATCHDOG=1', 'WATCHDOG=1']);
    notifier.close();
    vi.advanceTimersByTime(5000);
    expect(sent).toHaveLength(3);
  });

  it('MONOTONIC_USEC is CLOCK_MONOTONIC (the uptime clock, not the wall clock)', () => {
    const uptime = Number(/^[\d.]+/.exec(readFileSync('/proc/uptime', 'utf8'))![0]);
    // /proc/uptime is CLOCK_BOOTTIME, ahead of CLOCK_MONOTONIC only by time spent suspended.
    expect(Number(monotonicUsec()) / 1e6).toBeLessThanOrEqual(uptime + 1);
    expect(Number(monotonicUsec()) / 1e6).toBeGreaterThan(0);
  });
});

const libsystemd = ['/usr/lib/x86_64-linux-gnu/libsystemd.so.0', '/lib/x86_64-linux-gnu/libsystemd.so.0', '/usr/lib64/libsystemd.so.0'].some(existsSync);
const python = existsSync('/usr/bin/python3');

describe.skipIf(!libsystemd || !python)(
  `sd_notify through libsystemd ${libsystemd ? '' : '(skipped: no libsystemd.so.0)'}${python ? '' : '(skipped: no /usr/bin/python3)'}`,
  () => {
    let socket: NotifySocket | undefined;
    // sd_notify reads NOTIFY_SOCKET from the process's own environment (Node's process.env writes through to it).
    const setSocket = (address: string) => (process.env['NOTIFY_SOCKET'] = address);
    afterEach(() => {
      socket?.close();
      delete process.env['NOTIFY_SOCKET'];
    });

    for (const abstract of [false, true]) {
      it(`delivers to ${abstract ? 'an abstract socket (@name)' : 'a socket path'}`, async () => {
        socket = await openNotifySocket({ abstract });
        const failures: string[] = [];
        setSocket(socket.address);
        const notifier = openNotifier({ failed: (r) => failures.push(r) });
        notifier.send({ ready: true, status: 'enforcing policy sha256:abc… (1 rule)' });
        const got = await socket.next(() => true);
        expect(got.text).toBe('READY=1\nSTATUS=enforcing policy sha256:abc… (1 rule)');
        expect(failures).toEqual([]);
      });
    }

    it('logs once when nobody listens at NOTIFY_SOCKET', () => {
      const failures: string[] = [];
      setSocket('/nonexistent/egressd-notify');
      const notifier = openNotifier({ failed: (r) => failures.push(r) });
      notifier.send({ ready: true });
      notifier.send({ ready: true });
      expect(failures).toEqual(['sd_notify failed: errno 2']);
    });
  },
);
