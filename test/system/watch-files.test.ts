import { mkdirSync, mkdtempSync, renameSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { watchFiles, type FileWatch } from '../../src/system/watch-files.js';

/** The watch's calls, each awaited in turn: waits are bounded by the test's own timeout, never a fixed sleep to see something happen. */
function recorder() {
  const calls: (readonly string[])[] = [];
  let wake: (() => void) | undefined;
  return {
    calls,
    onChange: (files: readonly string[]) => {
      calls.push(files);
      wake?.();
    },
    next: (n: number) =>
      new Promise<void>((resolve) => {
        const check = () => (calls.length >= n ? resolve() : (wake = check));
        check();
      }),
  };
}

/** No call within `ms`: for what must not happen, a bounded wait is the only test there is. */
const quiet = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('watchFiles', () => {
  const root = mkdtempSync(join(tmpdir(), 'egd-watch-'));
  let watch: FileWatch | undefined;
  afterEach(() => watch?.close());
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it('sees a file replaced by rename (useradd writes passwd+ and renames it), once for the burst, and ignores the lock and backup files', async () => {
    const dir = join(root, 'etc1');
    mkdirSync(dir);
    writeFileSync(join(dir, 'passwd'), 'root:x:0:0::/root:/bin/sh\n');
    writeFileSync(join(dir, 'group'), 'root:x:0:\n');
    const seen = recorder();
    watch = watchFiles([join(dir, 'passwd'), join(dir, 'group')], seen.onChange, { debounceMs: 100 });
    writeFileSync(join(dir, 'passwd.lock'), '');
    writeFileSync(join(dir, 'passwd+'), 'root:x:0:0::/root:/bin/sh\nnew:x:1000:1000::/:/bin/sh\n');
    renameSync(join(dir, 'passwd'), join(dir, 'passwd-'));
    renameSync(join(dir, 'passwd+'), join(dir, 'passwd'));
    writeFileSync(join(dir, 'group+'), 'root:x:0:\nnew:x:1000:\n');
    renameSync(join(dir, 'group+'), join(dir, 'group'));
    unlinkSync(join(dir, 'passwd.lock'));
    await seen.next(1);
    expect(seen.calls).toEqual([[join(dir, 'group'), join(dir, 'passwd')]]);
    // A second edit after the rename is seen too: the directory is watched, not the replaced inode.
    writeFileSync(join(dir, 'passwd'), 'root:x:0:0::/root:/bin/sh\n');
    await seen.next(2);
    expect(seen.calls[1]).toEqual([join(dir, 'passwd')]);
    writeFileSync(join(dir, 'shadow'), '');
    writeFileSync(join(dir, 'passwd-'), '');
    await quiet(400);
    expect(seen.calls).toHaveLength(2);
  });

  it('follows a file that disappears and comes back', async () => {
    const dir = join(root, 'etc2');
    mkdirSync(dir);
    const file = join(dir, 'subuid');
    writeFileSync(file, 'a:100000:65536\n');
    const seen = recorder();
    watch = watchFiles([file], seen.onChange, { debounceMs: 50 });
    unlinkSync(file);
    await seen.next(1);
    writeFileSync(file, 'b:100000:65536\n');
    await seen.next(2);
    expect(seen.calls).toEqual([[file], [file]]);
  });

  it('waits for a directory that is not there yet, and for one removed and made again', async () => {
    const dir = join(root, 'run', 'resolve');
    const file = join(dir, 'resolv.conf');
    const seen = recorder();
    const errors: string[] = [];
    watch = watchFiles([file], seen.onChange, { debounceMs: 50, retryMs: 100, onWatchError: (d) => errors.push(d) });
    expect(errors).toEqual([dir]);
    mkdirSync(dir, { recursive: true });
    writeFileSync(file, 'nameserver 192.0.2.1\n');
    await seen.next(1);
    expect(seen.calls[0]).toEqual([file]);
    rmSync(dir, { recursive: true });
    mkdirSync(dir);
    await seen.next(2);
    const before = seen.calls.length;
    writeFileSync(file, 'nameserver 192.0.2.2\n');
    await seen.next(before + 1);
    expect(seen.calls.at(-1)).toEqual([file]);
  });
});
