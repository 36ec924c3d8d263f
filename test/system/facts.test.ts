import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { listCgroups } from '../../src/system/facts.js';

describe('listCgroups', () => {
  const root = mkdtempSync(join(tmpdir(), 'egd-cgfs-'));
  afterAll(() => rmSync(root, { recursive: true, force: true }));

  it('reads names as bytes: those nft cannot name come apart, with their nearest nameable ancestor; no deeper than asked', () => {
    writeFileSync(join(root, 'cgroup.controllers'), '');
    mkdirSync(join(root, 'u/ok.scope/deep/deeper'), { recursive: true });
    mkdirSync(Buffer.concat([Buffer.from(join(root, 'u/app')), Buffer.from([0xff, 0x0a]), Buffer.from('"é/child')]), { recursive: true });
    const found = listCgroups(root, 3);
    expect(found.named).toEqual(['u', 'u/ok.scope', 'u/ok.scope/deep']);
    expect(found.unnamed).toEqual([
      { path: 'u/app\ufffd\n"é', shown: '"u/app\\xff\\x0a\\"é"', namedAncestor: 'u' },
      { path: 'u/app\ufffd\n"é/child', shown: '"u/app\\xff\\x0a\\"é/child"', namedAncestor: 'u' },
    ]);
    expect(listCgroups(root, 1)).toEqual({ named: ['u'], unnamed: [] });
  });
});
