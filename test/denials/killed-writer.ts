/**
 * A denial-store writer killed mid-write (store-writer.ts, store-worker-writer.ts),
 * and what it left: for the SIGKILL tests of the store and its worker thread.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import Database from 'better-sqlite3';

/**
 * Starts `script` (a writer of this directory) on the database at `path`,
 * with `args` after it, and SIGKILLs it once it reported `atLeast` records
 * (killWriterAfter): the count it had reported, and the signal it died of.
 */
export async function killWriterMidWrite(
  script: string,
  path: string,
  args: readonly string[],
  atLeast: number,
): Promise<{ reported: number; signal: NodeJS.Signals | null }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, script), path, ...args], {
    cwd: join(import.meta.dirname, '../..'),
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const reported = await killWriterAfter(child, atLeast);
  return { reported, signal: child.signalCode };
}

/** What a killed writer left, read as SQLite reads it: its integrity check, and the writer's sequence numbers (each record's gid) in id order. */
export function writtenSequence(path: string): { integrity: unknown; seqs: number[] } {
  const check = new Database(path, { readonly: true });
  try {
    return {
      integrity: check.pragma('integrity_check'),
      seqs: (check.prepare('SELECT gid FROM denials ORDER BY id').all() as { gid: number }[]).map((r) => r.gid),
    };
  } finally {
    check.close();
  }
}

/**
 * SIGKILLs a writer (store-writer.ts, store-worker-writer.ts: each prints
 * "added N" as it hands records over) once it reported at least `atLeast`,
 * and resolves, once it exited, to the count it had reported then. A writer
 * that exits by itself first fails the test with what it printed.
 */
async function killWriterAfter(child: ChildProcess, atLeast: number): Promise<number> {
  let reported = 0;
  let text = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    text += chunk.toString();
    const all = [...text.matchAll(/added (\d+)\n/g)];
    if (all.length > 0) reported = Number(all[all.length - 1]![1]);
  });
  await new Promise<void>((resolve, reject) => {
    child.once('exit', () => reject(new Error(`the writer exited: ${text.slice(-500)}`)));
    const poll = setInterval(() => {
      if (reported >= atLeast) {
        clearInterval(poll);
        child.kill('SIGKILL');
        resolve();
      }
    }, 5);
  });
  await new Promise((r) => child.once('exit', r));
  return reported;
}
