import type { ChildProcess } from 'node:child_process';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import type { TestNet } from '../harness/index.js';

const FIXTURE = join(import.meta.dirname, 'fixtures', 'tracker.ts');
const TSX = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;

export interface TrackerEvent {
  readonly ev: string;
  readonly path?: string;
  readonly id?: string;
  readonly added?: boolean;
  readonly maps?: string[];
  readonly at?: number;
  readonly [key: string]: unknown;
}

/** The tracker fixture in the test net's host namespaces, with its events as they come. */
export interface RunningTracker {
  readonly child: ChildProcess;
  readonly events: TrackerEvent[];
  send(command: object): void;
  /** The first event from index `from` on that `match` accepts. */
  waitFor(match: (e: TrackerEvent) => boolean, timeoutMs?: number, from?: number): Promise<TrackerEvent>;
  stop(): Promise<void>;
}

export async function startTracker(net: TestNet, config: object): Promise<RunningTracker> {
  const child = net.host.spawn(process.execPath, ['--import', TSX, FIXTURE, JSON.stringify(config)]);
  const events: TrackerEvent[] = [];
  const waiters = new Set<() => void>();
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  createInterface({ input: child.stdout! }).on('line', (line) => {
    try {
      events.push(JSON.parse(line) as TrackerEvent);
    } catch {
      events.push({ ev: 'noise', line });
    }
    for (const wake of waiters) wake();
  });
  let exited = false;
  child.on('exit', () => {
    exited = true;
    for (const wake of waiters) wake();
  });
  const waitFor = (match: (e: TrackerEvent) => boolean, timeoutMs = 5000, from = 0): Promise<TrackerEvent> =>
    new Promise((resolve, reject) => {
      const check = (): boolean => {
        const found = events.slice(from).find(match);
        if (found) {
          finish();
          resolve(found);
          return true;
        }
        if (exited) {
          finish();
          reject(new Error(`the tracker exited: ${stderr}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        finish();
        reject(new Error(`no such event within ${timeoutMs} ms; events: ${JSON.stringify(events.slice(-10))}; stderr: ${stderr}`));
      }, timeoutMs);
      const finish = (): void => {
        clearTimeout(timer);
        waiters.delete(wake);
      };
      const wake = (): void => void check();
      if (!check()) waiters.add(wake);
    });
  const tracker: RunningTracker = {
    child,
    events,
    send: (command) => child.stdin!.write(`${JSON.stringify(command)}\n`),
    waitFor,
    async stop() {
      if (exited) return;
      tracker.send({ cmd: 'close' });
      await Promise.race([waitFor((e) => e.ev === 'closed', 5000).catch(() => undefined)]);
      child.kill();
    },
  };
  await waitFor((e) => e.ev === 'ready', 30_000);
  return tracker;
}

/** performance.timeOrigin + performance.now(): the clock the fixture stamps its events with. */
export function wallNow(): number {
  return performance.timeOrigin + performance.now();
}

/** Every element of every live map of `base` (e.g. "app_cg_l2"), as nft lists them (cgroup paths), and the maps' names. */
export async function mapElements(net: TestNet, base: string): Promise<{ maps: string[]; elements: string[] }> {
  const r = await net.host.nft(['-j', 'list', 'maps', 'inet']);
  const listed = JSON.parse(r.stdout) as { nftables: { map?: { name: string; table: string } }[] };
  const maps = listed.nftables.flatMap((x) => (x.map && x.map.table === 'egressd' && x.map.name.startsWith(`${base}.`) ? [x.map.name] : []));
  const elements: string[] = [];
  for (const map of maps) {
    const one = await net.host.nft(['-j', 'list', 'map', 'inet', 'egressd', map]);
    const body = JSON.parse(one.stdout) as { nftables: { map?: { elem?: [unknown, unknown][] } }[] };
    for (const item of body.nftables) for (const [key] of item.map?.elem ?? []) elements.push(String(key));
  }
  return { maps, elements };
}
