import { mkdtempSync, rmSync, symlinkSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, afterEach } from 'vitest';

const made: string[] = [];
const kept: string[] = [];
afterEach(() => {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
});
// Several files kept theirs for good: ~3 directories a run were left in /tmp.
afterAll(() => {
  for (const dir of kept.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/**
 * A throwaway policy directory; `{ symlink: target }` makes a link. Removed
 * after each test, or — with `keep` — after the file's last test (for one
 * made in a beforeAll that several tests share).
 */
export function policyDir(files: Record<string, string | Uint8Array | { symlink: string }>, options: { keep?: boolean } = {}): string {
  const dir = mkdtempSync(join(tmpdir(), 'egd-policy-'));
  (options.keep ? kept : made).push(dir);
  for (const [name, content] of Object.entries(files)) {
    const path = join(dir, name);
    mkdirSync(dirname(path), { recursive: true });
    if (typeof content === 'object' && 'symlink' in content) symlinkSync(content.symlink, path);
    else writeFileSync(path, content);
  }
  return dir;
}
