import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

/** The log's event names are the fleet interface README documents: every one the code emits is in README's table or list. */
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
    const section = readme.slice(readme.indexOf('## egressd under systemd, and its log'), readme.indexOf('## egressctl'));
    expect(emitted.size).toBeGreaterThan(10);
    expect([...emitted].filter((event) => !section.includes(`\`${event}\``))).toEqual([]);
  });
});
