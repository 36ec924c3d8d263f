import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { expect, it, vi } from 'vitest';

/**
 * What makes the write durable is the order of system calls, which no
 * crash a test can cause shows: the file's data synced before the rename,
 * the directory synced after it. Recorded through node:fs.
 */
const calls: string[] = [];
const paths = new Map<number, string>();
vi.mock('node:fs', async (importOriginal) => {
  const fs = await importOriginal<typeof import('node:fs')>();
  const openSync = (path: string, ...rest: unknown[]) => {
    const fd = (fs.openSync as (...args: unknown[]) => number)(path, ...rest);
    paths.set(fd, path);
    return fd;
  };
  const fsyncSync = (fd: number) => {
    calls.push(`fsync ${paths.get(fd)}`);
    fs.fsyncSync(fd);
  };
  const renameSync = (from: string, to: string) => {
    calls.push(`rename ${from} -> ${to}`);
    fs.renameSync(from, to);
  };
  return { ...fs, default: { ...fs, openSync, fsyncSync, renameSync }, openSync, fsyncSync, renameSync };
});

it('syncs the temporary file, renames it over the file, then syncs the directory', async () => {
  const { writeFileAtomic } = await import('../../src/state/files.js');
  const dir = mkdtempSync(join(tmpdir(), 'egd-order-'));
  try {
    writeFileAtomic(dir, 'switches.json', '{}');
    expect(calls).toHaveLength(3);
    const temp = /^fsync (.*\/\.switches\.json\.tmp-\d+-[0-9a-f]{8})$/.exec(calls[0]!)?.[1];
    expect(temp, calls[0]).toBeDefined();
    expect(calls.slice(1)).toEqual([`rename ${temp} -> ${join(dir, 'switches.json')}`, `fsync ${dir}`]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
