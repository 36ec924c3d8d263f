import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';

const FIXTURE = join(import.meta.dirname, '..', 'enforce', 'fixtures', 'hold-lock.ts');

/**
 * A child process that holds an enforcement lock (test/enforce/fixtures/hold-lock.ts)
 * until `letGo`; resolves once it holds it. `path` "-" is the lock of the
 * network namespace it runs in: `netns`, or this process's.
 */
export async function holdLock(path: string, what: string, netns?: string): Promise<{ child: ChildProcess; letGo: () => void; exited: Promise<void> }> {
  const command = [process.execPath, '--import', 'tsx', FIXTURE, path, what];
  const child = netns
    ? spawn('nsenter', [`--net=/run/netns/${netns}`, ...command], { stdio: ['pipe', 'pipe', 'inherit'] })
    : spawn(command[0]!, command.slice(1), { stdio: ['pipe', 'pipe', 'inherit'] });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await new Promise<void>((resolve, reject) => {
    child.stdout.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`hold-lock.ts exited (${code}) before it held the lock`)));
  });
  return { child, letGo: () => child.stdin.end(), exited };
}
