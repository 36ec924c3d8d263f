import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

/** The log's event names are the fleet interface README documents: every one the code emits has a row in README's table. */
const ROOT = join(import.meta.dirname, '..', '..');

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((entry) =>
    entry.isDirectory() ? sources(join(dir, entry.name)) : entry.name.endsWith('.ts') ? [join(dir, entry.name)] : [],
  );
}

describe('log events', () => {
  it('every event the code logs is documented in README', () => {
    const emitted = new Set(sources(join(ROOT, 'src')).flatMap((file) => [...readFileSync(file, 'utf8').matchAll(/\bevent: '([a-z-]+)'/g)].map((m) => m[1]!)));
    const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
    const documented = new Set([...readme.matchAll(/^\| `([a-z-]+)` \| (?:info|warn|error|fatal) \|/gm)].map((m) => m[1]!));
    expect(emitted.size).toBeGreaterThan(10);
    expect([...emitted].filter((event) => !documented.has(event))).toEqual([]);
  });
});
