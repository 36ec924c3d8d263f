import type { ChildProcess } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';

/**
 * Waiting for a thing, not for a time. Each wait is bounded so that a thing
 * that never happens fails the test with what it waited for, instead of
 * hanging it or passing on a guess.
 */

/** Polls `check` until it holds; throws naming `what` once `timeoutMs` has passed. */
export async function until(what: string, check: () => boolean | Promise<boolean>, { timeoutMs = 20_000, everyMs = 20 } = {}): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (await check()) return;
    if (Date.now() >= deadline) throw new Error(`gave up after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}

/**
 * Resolves once `child` has printed `text` on `stream`; rejects if it exits
 * first or `timeoutMs` passes, with what it printed. Collects from the call
 * on: call it before the child can print the line.
 */
export function printed(child: ChildProcess, stream: 'stdout' | 'stderr', text: string, timeoutMs = 20_000): Promise<string> {
  const source = child[stream];
  if (source === null) return Promise.reject(new Error(`${stream} of pid ${child.pid} is not a pipe`));
  return new Promise((resolve, reject) => {
    let seen = '';
    const done = (error?: Error) => {
      clearTimeout(timer);
      source.off('data', onData);
      child.off('exit', onExit);
      if (error) reject(error);
      else resolve(seen);
    };
    const onData = (chunk: Buffer) => {
      seen += chunk.toString();
      if (seen.includes(text)) done();
    };
    const onExit = (code: number | null, signal: string | null) =>
      done(new Error(`pid ${child.pid} exited (${signal ?? code}) before it printed "${text}"; it printed: ${seen}`));
    const timer = setTimeout(
      () => done(new Error(`gave up after ${timeoutMs} ms waiting for pid ${child.pid} to print "${text}"; it printed: ${seen}`)),
      timeoutMs,
    );
    source.on('data', onData);
    child.once('exit', onExit);
  });
}
