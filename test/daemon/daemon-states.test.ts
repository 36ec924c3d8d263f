import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { Daemon, daemonState, PART_BACKOFF, restartDelay, statusLine, type Backoff } from '../../src/daemon/daemon.js';
import type { Part, PartSpec } from '../../src/daemon/part.js';
import { readiness } from '../../src/daemon/readiness.js';
import { parseInvocation } from '../../src/daemon/run.js';
import type { Applied } from '../../src/enforce/enforcer.js';
import { EgressError, ErrorCode } from '../../src/errors.js';
import type { Nft } from '../../src/nft/client.js';
import type { InForce } from '../../src/resolver/runtime.js';
import { notifyMessage } from '../../src/system/sd-notify.js';
import { until } from '../support/wait.js';

/** The daemon's state machine with the apply and the parts given: no kernel, real timers, short back-off. */
const FAST: Backoff = { firstMs: 200, maxMs: 2000, jitter: 0.25, healthyAfterMs: 60_000 };

interface Line {
  event?: string;
  part?: string;
  phase?: string;
  retryInMs?: number;
  state?: string;
}

function applied(digest: string): Applied {
  return {
    digest,
    lockdown: false,
    compiled: { warnings: [], ruleIds: ['r1', 'r2'] },
    sweep: { cut: [] },
    liveNames: new Map(),
    policy: {},
    facts: {},
  } as unknown as Applied;
}

function harness(options: { parts: PartSpec[]; apply?: () => Promise<Applied>; off?: string[] }) {
  const lines: Line[] = [];
  const sent: string[] = [];
  const log = pino({ level: 'debug' }, { write: (text: string) => lines.push(JSON.parse(text) as Line) });
  let n = 0;
  const daemon = new Daemon({
    policyDir: '/nonexistent',
    stateDir: '/nonexistent',
    nft: {} as unknown as Nft,
    log,
    readiness: readiness({ enabled: true, send: (f) => sent.push(notifyMessage(f)), startWatchdog: () => undefined, close: () => undefined }, () => 1n),
    apply: options.apply ?? (() => Promise.resolve(applied(`d${++n}`.padEnd(64, '0')))),
    tableInForce: () => Promise.resolve(true),
    parts: options.parts,
    ...(options.off ? { off: options.off } : {}),
    backoff: FAST,
    random: () => 0.5,
    partTimeoutMs: 500,
  });
  return { daemon, lines, sent, events: (event: string) => lines.filter((l) => l.event === event) };
}

/** A part whose life the test drives: `crash()` settles its `stopped`. */
function scripted(name: string, behaviour: { startFails?: number; startThrows?: boolean; updateThrows?: boolean } = {}) {
  const instances: { inForce: InForce[]; closed: boolean; crash: (why: string) => void }[] = [];
  let starts = 0;
  const spec: PartSpec = {
    name,
    start(inForce) {
      starts++;
      if (starts <= (behaviour.startFails ?? 0)) {
        // A part written without async throws before it returns a promise (the NFLOG group held by another reader: EBUSY).
        if (behaviour.startThrows) throw new Error(`start ${starts} refused`);
        return Promise.reject(new Error(`start ${starts} refused`));
      }
      let crash!: (why: string) => void;
      const stopped = new Promise<never>((_, reject) => (crash = (why) => reject(new Error(why))));
      const instance = { inForce: [inForce], closed: false, crash };
      instances.push(instance);
      const part: Part = {
        update(next) {
          if (behaviour.updateThrows) return Promise.reject(new Error('cannot take it'));
          instance.inForce.push(next);
          return Promise.resolve();
        },
        close() {
          instance.closed = true;
          return Promise.resolve();
        },
        stopped,
        describe: () => `${name} fine`,
        learnedNames: (address) => (address === '192.0.2.7' ? [{ name: 'tracker.example', asked: true }] : []),
      };
      return Promise.resolve(part);
    },
  };
  return { spec, instances, starts: () => starts };
}

describe('restart back-off', () => {
  it('doubles from 0.5 s to at most 60 s, each delay shortened by up to a quarter at random', () => {
    expect([1, 2, 3, 4, 5, 6, 7, 8, 9, 50].map((f) => restartDelay(f, PART_BACKOFF, () => 0))).toEqual([
      500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000,
    ]);
    expect(restartDelay(1, PART_BACKOFF, () => 0.999_999)).toBe(375);
    expect(restartDelay(1000, PART_BACKOFF, () => 1)).toBe(45_000);
    for (let f = 1; f < 40; f++) expect(restartDelay(f)).toBeLessThanOrEqual(60_000);
  });
});

describe('daemon state', () => {
  it('is the phase, or degraded when the last apply failed or a part is failing', () => {
    expect(daemonState('starting', true, true)).toBe('starting');
    expect(daemonState('reloading', false, true)).toBe('reloading');
    expect(daemonState('stopping', true, false)).toBe('stopping');
    expect(daemonState('running', false, false)).toBe('enforcing');
    expect(daemonState('running', true, false)).toBe('degraded');
    expect(daemonState('running', false, true)).toBe('degraded');
  });

  it('says why a part does not run in its STATUS line', () => {
    expect(statusLine({ name: 'resolver', state: 'running', detail: 'resolver on ::1', restarts: 0 })).toBe('resolver on ::1');
    expect(statusLine({ name: 'apps', state: 'running', restarts: 0 })).toBe('apps running');
    expect(statusLine({ name: 'apps', state: 'restarting', restarts: 1 })).toBe('apps restarting (1 restart)');
    expect(statusLine({ name: 'apps', state: 'failed', restarts: 3 })).toBe('apps failed (3 restarts)');
    expect(statusLine({ name: 'apps', state: 'off', restarts: 0 })).toBe('apps off');
  });
});

describe('Daemon', () => {
  it('starts its parts after the first apply, then READY with their lines; parts off are reported off', async () => {
    const a = scripted('a');
    const { daemon, sent } = harness({ parts: [a.spec, scripted('b').spec], off: ['b'] });
    expect(daemon.state).toBe('starting');
    expect(await daemon.start()).toBe(true);
    expect(daemon.state).toBe('enforcing');
    expect(a.instances).toHaveLength(1);
    expect(sent).toEqual([`READY=1\nSTATUS=enforcing policy sha256:d10000000000… (2 rules), a fine, b off`]);
    expect(daemon.status()).toMatchObject({
      state: 'enforcing',
      digest: 'd1'.padEnd(64, '0'),
      parts: [
        { name: 'a', state: 'running', detail: 'a fine', restarts: 0 },
        { name: 'b', state: 'off', restarts: 0 },
      ],
    });
    expect(daemon.learnedNames('192.0.2.7', 1000)).toEqual([{ name: 'tracker.example', asked: true }]);
    expect(daemon.learnedNames('192.0.2.8', 1000)).toEqual([]);
    await daemon.stop('SIGTERM');
  });

  it('a part that crashes is reported, closed and started again with growing delays; the rest go on', async () => {
    const a = scripted('a');
    const b = scripted('b');
    const { daemon, events, sent } = harness({ parts: [a.spec, b.spec] });
    await daemon.start();
    for (let crash = 1; crash <= 3; crash++) {
      a.instances.at(-1)!.crash(`crash ${crash}`);
      await until(`a reported after crash ${crash}`, () => events('part-failed').length === crash, { everyMs: 5 });
      expect(daemon.state).toBe('degraded');
      expect(daemon.status().parts[0]).toMatchObject({ name: 'a', state: 'restarting', detail: `crash ${crash}`, restarts: crash - 1 });
      await until(`a back after crash ${crash}`, () => a.instances.length === crash + 1 && daemon.state === 'enforcing');
    }
    const failed = events('part-failed');
    expect(failed.map((l) => [l.part, l.phase])).toEqual([
      ['a', 'stopped'],
      ['a', 'stopped'],
      ['a', 'stopped'],
    ]);
    // 200, 400, 800 ms, each less an eighth (random 0.5 × jitter 0.25).
    expect(failed.map((l) => l.retryInMs)).toEqual([175, 350, 700]);
    expect(a.instances.slice(0, 3).every((i) => i.closed)).toBe(true);
    expect(b.instances).toHaveLength(1);
    expect(daemon.status().parts[0]).toMatchObject({ state: 'running', restarts: 3 });
    expect(sent).toContain('STATUS=enforcing policy sha256:d10000000000… (2 rules), a restarting (0 restarts), b fine');
    expect(events('state-changed').map((l) => l.state)).toEqual(['enforcing', 'degraded', 'enforcing', 'degraded', 'enforcing', 'degraded', 'enforcing']);
    await daemon.stop('SIGTERM');
  });

  it('a part whose start throws is retried until it starts, and gets the policy applied meanwhile', async () => {
    const a = scripted('a', { startFails: 2 });
    const { daemon, events } = harness({ parts: [a.spec] });
    await daemon.start();
    expect(daemon.status().parts[0]).toMatchObject({ state: 'failed', detail: 'start 1 refused' });
    expect(daemon.state).toBe('degraded');
    expect(await daemon.reload('SIGHUP')).toEqual({ applied: true, digest: 'd2'.padEnd(64, '0') });
    await until('a started', () => a.instances.length === 1);
    expect(a.starts()).toBe(3);
    expect(a.instances[0]!.inForce.at(-1)).toMatchObject({ digest: 'd2'.padEnd(64, '0') });
    expect(events('part-failed').map((l) => l.phase)).toEqual(['start', 'start']);
    await until('enforcing', () => daemon.state === 'enforcing');
    await daemon.stop('SIGTERM');
  });

  it('a part whose start throws before returning a promise fails like one that rejects: start-up goes on, later reloads run', async () => {
    const a = scripted('a', { startFails: 1, startThrows: true });
    const b = scripted('b');
    const { daemon, events } = harness({ parts: [a.spec, b.spec] });
    await daemon.start();
    expect(daemon.status().parts[0]).toMatchObject({ state: 'failed', detail: 'start 1 refused' });
    expect(b.instances).toHaveLength(1);
    expect(await daemon.reload('SIGHUP')).toEqual({ applied: true, digest: 'd2'.padEnd(64, '0') });
    await until('a started', () => a.instances.length === 1);
    expect(events('part-failed').map((l) => l.phase)).toEqual(['start']);
    await daemon.stop('SIGTERM');
  });

  it('a part whose update throws is restarted with the new policy', async () => {
    const a = scripted('a', { updateThrows: true });
    const { daemon, events } = harness({ parts: [a.spec] });
    await daemon.start();
    await daemon.reload('SIGHUP');
    expect(events('part-failed').map((l) => l.phase)).toEqual(['update']);
    await until('a again', () => a.instances.length === 2);
    expect(a.instances[0]!.closed).toBe(true);
    expect(a.instances[1]!.inForce[0]).toMatchObject({ digest: 'd2'.padEnd(64, '0') });
    await daemon.stop('SIGTERM');
  });

  it('a failed apply keeps what holds, is degraded and says every error; the next good one is enforcing again', async () => {
    const a = scripted('a');
    let broken = false;
    let n = 0;
    const apply = () =>
      broken
        ? Promise.reject(new EgressError(ErrorCode.PolicyInvalid, 'policy invalid', { details: ['/p/10.yaml:2:14: bad', '/p/20.yaml:1:1: worse'] }))
        : Promise.resolve(applied(`d${++n}`.padEnd(64, '0')));
    const { daemon, sent, events } = harness({ parts: [a.spec], apply });
    await daemon.start();
    broken = true;
    expect(await daemon.reload('SIGHUP')).toEqual({ applied: false, code: ErrorCode.PolicyInvalid, errors: ['/p/10.yaml:2:14: bad', '/p/20.yaml:1:1: worse'] });
    expect(daemon.state).toBe('degraded');
    expect(daemon.status().digest).toBe('d1'.padEnd(64, '0'));
    expect(sent.at(-1)).toBe(
      'READY=1\nSTATUS=apply failed: 2 errors in the policy (/p/10.yaml:2:14: bad; /p/20.yaml:1:1: worse); previous table stays in force',
    );
    expect(a.instances[0]!.inForce).toHaveLength(1);
    expect(events('apply-failed')).toHaveLength(1);
    broken = false;
    expect(await daemon.reload('SIGHUP')).toMatchObject({ applied: true });
    expect(daemon.state).toBe('enforcing');
    expect(a.instances[0]!.inForce).toHaveLength(2);
    await daemon.stop('SIGTERM');
  });

  it('reloads asked for during an apply are coalesced into one, and each caller gets its outcome', async () => {
    let release!: () => void;
    let applies = 0;
    const apply = async () => {
      applies++;
      if (applies === 2) await new Promise<void>((resolve) => (release = resolve));
      return applied(`d${applies}`.padEnd(64, '0'));
    };
    const { daemon } = harness({ parts: [], apply });
    await daemon.start();
    const first = daemon.reload('SIGHUP');
    await until('second apply running', () => applies === 2);
    expect(daemon.state).toBe('reloading');
    const queued = [daemon.reload('SIGHUP'), daemon.reload('accounts changed'), daemon.reload('dbus')];
    release();
    expect(await first).toEqual({ applied: true, digest: 'd2'.padEnd(64, '0') });
    for (const outcome of await Promise.all(queued)) expect(outcome).toEqual({ applied: true, digest: 'd3'.padEnd(64, '0') });
    expect(applies).toBe(3);
    await daemon.stop('SIGTERM');
  });

  it('stopping closes every part, starts none again, and answers a reload without applying', async () => {
    const a = scripted('a');
    const { daemon, sent, events } = harness({ parts: [a.spec] });
    await daemon.start();
    a.instances[0]!.crash('crash');
    await until('reported', () => events('part-failed').length === 1, { everyMs: 5 });
    expect(daemon.state).toBe('degraded');
    await daemon.stop('SIGTERM');
    expect(daemon.state).toBe('stopping');
    expect(await daemon.reload('SIGHUP')).toEqual({ applied: false, code: ErrorCode.Stopping, errors: ['egressd is stopping; the rules in force stay'] });
    // Past the 175 ms its restart was due.
    await new Promise((r) => setTimeout(r, 400));
    expect(a.instances).toHaveLength(1);
    expect(sent.at(-1)).toBe('STOPPING=1\nSTATUS=stopping (SIGTERM); the rules stay in force');
    expect(events('stopping')).toHaveLength(1);
  });
});

describe('stopping, in order', () => {
  it("closes the parts one after the other as listed, so what a part says as it closes reaches the parts after it (the reader's last aggregates, the store)", async () => {
    const heard: string[] = [];
    let listening = true;
    const producer: PartSpec = {
      name: 'reader',
      start: () =>
        Promise.resolve({
          update: () => Promise.resolve(),
          // Its last records go out while it closes, a moment later (the reader's loop ends at its next poll).
          close: async () => {
            await new Promise((r) => setTimeout(r, 50));
            if (listening) heard.push('last aggregates kept');
          },
          stopped: new Promise<never>(() => undefined),
          describe: () => 'reader',
        }),
    };
    const consumer: PartSpec = {
      name: 'store',
      start: () =>
        Promise.resolve({
          update: () => Promise.resolve(),
          close: () => {
            listening = false;
            return Promise.resolve();
          },
          stopped: new Promise<never>(() => undefined),
          describe: () => 'store',
        }),
    };
    const { daemon } = harness({ parts: [producer, consumer] });
    await daemon.start();
    await daemon.stop('SIGTERM');
    expect(heard).toEqual(['last aggregates kept']);
  });
});

describe('stopping waits for closes already under way', () => {
  it('a part that failed just before the stop has finished closing when stop returns', async () => {
    let crash!: (why: string) => void;
    let closed = false;
    const failing: PartSpec = {
      name: 'failing',
      start: () =>
        Promise.resolve({
          update: () => Promise.resolve(),
          close: async () => {
            await new Promise((r) => setTimeout(r, 100));
            closed = true;
          },
          stopped: new Promise<never>((_, reject) => (crash = (why) => reject(new Error(why)))),
          describe: () => 'failing',
        }),
    };
    const { daemon, events } = harness({ parts: [failing] });
    await daemon.start();
    crash('gone');
    await until('reported', () => events('part-failed').length === 1, { everyMs: 5 });
    await daemon.stop('SIGTERM');
    expect(closed).toBe(true);
  });
});

describe('which parts run', () => {
  const parts: PartSpec[] = [scripted('resolver').spec, scripted('apps').spec];

  it('--no-NAME turns a part off; an unknown one is a usage error naming it', () => {
    expect(parseInvocation(['--policy', '/p', '--no-resolver'], parts, {})).toEqual({
      mode: 'daemon',
      policyDir: '/p',
      stateDir: '/var/lib/egressd',
      off: ['resolver'],
    });
    expect(parseInvocation([], parts, { EGRESSD_STATE_DIR: '/s' })).toEqual({ mode: 'daemon', policyDir: '/etc/egressd', stateDir: '/s', off: [] });
    expect(parseInvocation(['resolver'], parts, {})).toMatchObject({ mode: 'resolver', off: [] });
    expect(parseInvocation(['--no-tor'], parts, {})).toEqual({ error: expect.stringContaining("'--no-tor'") as unknown });
    expect(parseInvocation(['apply'], parts, {})).toEqual({ error: "unknown command 'apply'" });
  });
});
