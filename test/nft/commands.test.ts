/**
 * The pure parts of src/nft: JSON constructors, element conversion, the
 * table-text guard, and the libnftables backend's context discipline driven
 * through a fake C API (no kernel, no root).
 */
import { describe, expect, it } from 'vitest';
import { EgressError, ErrorCode } from '../../src/errors.js';
import { Nft } from '../../src/nft/client.js';
import {
  batchDocument,
  cmd,
  describeCommand,
  elem,
  elementsOf,
  toElemJson,
  verdict,
} from '../../src/nft/commands.js';
import { createLibnftablesBackend, NftOutputFlag, type LibnftablesApi, type NftCtx } from '../../src/nft/libnftables.js';
import { checkTableText, replaceTableText } from '../../src/nft/table-text.js';

const dns4 = { family: 'inet', table: 'egressd', name: 'dns4' } as const;

describe('JSON command constructors', () => {
  it('build libnftables JSON with metainfo first', () => {
    const doc = JSON.parse(
      batchDocument([cmd.add.element(dns4, toElemJson(['192.0.2.1'], { op: 'add', timeout: 30 })), cmd.list.tables()]),
    ) as unknown;
    expect(doc).toEqual({
      nftables: [
        { metainfo: { json_schema_version: 1 } },
        {
          add: {
            element: { family: 'inet', table: 'egressd', name: 'dns4', elem: [{ elem: { val: '192.0.2.1', timeout: 30 } }] },
          },
        },
        { list: { tables: null } },
      ],
    });
  });

  it('convert keys, prefixes, map pairs and per-element timeouts', () => {
    expect(
      toElemJson(
        [
          '2001:db8::1',
          elem.prefix('198.51.100.0', 24),
          7,
          { key: 'system.slice/foo.service', data: verdict.jump('app_foo') },
          { key: '192.0.2.9', data: verdict.drop(), timeout: 5, comment: 'x' },
          { key: '192.0.2.10' },
        ],
        { op: 'add', timeout: 60 },
      ),
    ).toEqual([
      { elem: { val: '2001:db8::1', timeout: 60 } },
      { elem: { val: { prefix: { addr: '198.51.100.0', len: 24 } }, timeout: 60 } },
      { elem: { val: 7, timeout: 60 } },
      [{ elem: { val: 'system.slice/foo.service', timeout: 60 } }, { jump: { target: 'app_foo' } }],
      [{ elem: { val: '192.0.2.9', timeout: 5, comment: 'x' } }, { drop: null }],
      { elem: { val: '192.0.2.10', timeout: 60 } },
    ]);
    expect(toElemJson(['192.0.2.1'], { op: 'add' })).toEqual(['192.0.2.1']);
  });

  it('send only keys on delete', () => {
    expect(
      toElemJson([{ key: '192.0.2.9', data: verdict.accept(), timeout: 5 }, '192.0.2.1'], { op: 'delete' }),
    ).toEqual(['192.0.2.9', '192.0.2.1']);
  });

  it('refuse timeouts nft JSON cannot carry', () => {
    for (const bad of [0, -1, 1.5, Number.NaN]) {
      expect(() => toElemJson(['192.0.2.1'], { op: 'add', timeout: bad })).toThrow(/whole number of seconds/);
    }
    expect(() => elem.withOptions('192.0.2.1', { timeout: 0.5 })).toThrow(EgressError);
  });

  it('describe commands for error messages', () => {
    expect(describeCommand(cmd.add.element(dns4, ['192.0.2.1', '192.0.2.2']))).toBe(
      'add element inet egressd dns4 (2 elements)',
    );
    expect(describeCommand(cmd.delete.table('inet', 'egressd'))).toBe('delete table inet egressd');
    expect(describeCommand(cmd.list.tables())).toBe('list tables');
  });

  it('flatten listed elements', () => {
    expect(
      elementsOf({
        elem: [
          '192.0.2.1',
          { elem: { val: '192.0.2.2', timeout: 30, expires: 29 } },
          [{ elem: { val: '192.0.2.3', timeout: 60, expires: 12 } }, { goto: { target: 'c' } }],
          ['app', { accept: null }],
        ],
      }),
    ).toEqual([
      { key: '192.0.2.1' },
      { key: '192.0.2.2', timeout: 30, expires: 29 },
      { key: '192.0.2.3', data: { goto: { target: 'c' } }, timeout: 60, expires: 12 },
      { key: 'app', data: { accept: null } },
    ]);
    expect(elementsOf({})).toEqual([]);
  });
});

describe('table text guard', () => {
  const good = `# header comment\ntable inet egressd {\n  chain c { comment "a } brace"; } # }\n}\n# trailer\n`;

  it('accepts exactly one block for the named table', () => {
    expect(() => checkTableText('inet', 'egressd', good)).not.toThrow();
    expect(replaceTableText('inet', 'egressd', good)).toBe(
      `add table inet egressd; delete table inet egressd; ${good}\n`,
    );
  });

  it.each([
    ['another table', 'table inet other {\n}'],
    ['another family', 'table ip egressd {\n}'],
    ['a second statement after the table', 'table inet egressd {\n}\nflush ruleset'],
    ['a statement before the table', 'flush ruleset\ntable inet egressd {\n}'],
    ['unbalanced braces', 'table inet egressd {\n chain c {\n}'],
  ])('refuses %s before anything reaches nft', (_, text) => {
    let caught: unknown;
    try {
      replaceTableText('inet', 'egressd', text);
    } catch (err) {
      caught = err;
    }
    expect(caught).toBeInstanceOf(EgressError);
    expect((caught as EgressError).code).toBe(ErrorCode.NftApply);
    expect((caught as EgressError).message).toContain('nothing was sent to nft');
  });

  it('refuses names that are not plain identifiers', () => {
    expect(() => replaceTableText('inet', 'egressd; flush ruleset', 'table inet x {}')).toThrow(/identifier/);
  });
});

/** A fake libnftables that records every call and hands out distinct contexts. */
function fakeLibrary(script: { rc?: number; error?: string; output?: string; throwOnRun?: boolean } = {}) {
  const calls: string[] = [];
  let made = 0;
  const live = new Set<NftCtx>();
  const api: LibnftablesApi = {
    ctxNew: () => {
      made += 1;
      const ctx = { __brand: 'nft_ctx', id: made } as unknown as NftCtx;
      live.add(ctx);
      calls.push(`new#${made}`);
      return ctx;
    },
    ctxFree: (ctx) => {
      calls.push('free');
      live.delete(ctx);
    },
    ctxFreeAsync: async (ctx) => {
      calls.push('worker-free');
      live.delete(ctx);
      return Promise.resolve();
    },
    bufferOutput: () => 0,
    bufferError: () => 0,
    getOutputBuffer: () => script.output ?? '',
    getErrorBuffer: () => script.error ?? '',
    outputGetFlags: () => 0,
    outputSetFlags: (_, flags) => calls.push(`flags=${flags}`),
    setDryRun: (_, dry) => calls.push(`dry=${String(dry)}`),
    runCmdFromBuffer: (_, buffer) => {
      if (script.throwOnRun === true) throw new Error('boom');
      calls.push(`buffer:${buffer.length > 0 ? 'json' : 'empty'}`);
      return script.rc ?? 0;
    },
    runCmdFromBufferAsync: async (_, buffer) => {
      if (script.throwOnRun === true) throw new Error('boom');
      calls.push(`worker-buffer:${buffer.length > 0 ? 'json' : 'empty'}`);
      return Promise.resolve(script.rc ?? 0);
    },
    runCmdFromFilename: async (_, filename) => {
      if (script.throwOnRun === true) throw new Error('boom');
      calls.push(`file:${filename.endsWith('input.nft') ? 'input.nft' : filename}`);
      return Promise.resolve(script.rc ?? 0);
    },
  };
  return { api, calls, live, made: () => made };
}

describe('libnftables backend, through a fake C API', () => {
  it('uses a fresh nft_ctx for every transaction and frees it', async () => {
    const fake = fakeLibrary();
    const client = new Nft(createLibnftablesBackend(fake.api));
    await client.addElements(dns4, ['192.0.2.1'], { timeout: 30 });
    await client.addElements(dns4, ['192.0.2.2']);
    await client.replaceTable('inet', 'egressd', 'table inet egressd {\n}');
    expect(fake.made()).toBe(3);
    expect(fake.live.size).toBe(0);
    expect(fake.calls).toEqual([
      'new#1',
      `flags=${NftOutputFlag.Json}`,
      'buffer:json',
      'free',
      'new#2',
      `flags=${NftOutputFlag.Json}`,
      'buffer:json',
      'free',
      'new#3',
      'flags=0',
      'file:input.nft',
      // A text transaction's context is freed off the event loop, like the transaction: closing waits for the kernel.
      'worker-free',
    ]);
  });

  it('sets dry run for check mode and terse for terse listings', async () => {
    const fake = fakeLibrary();
    const client = new Nft(createLibnftablesBackend(fake.api));
    await client.run({ text: 'add table inet x' }, { check: true });
    await client.run({ json: [cmd.list.tables()] }, { terse: true });
    expect(fake.calls).toContain('dry=true');
    expect(fake.calls).toContain(`flags=${NftOutputFlag.Json | NftOutputFlag.Terse}`);
  });

  it('runs short JSON commands on the event loop, and long ones (text, whole listings) on a worker', async () => {
    const fake = fakeLibrary();
    const client = new Nft(createLibnftablesBackend(fake.api));
    await client.addElements(dns4, ['192.0.2.1']);
    await client.run({ text: 'add table inet x' });
    await client.run({ json: [cmd.list.table('inet', 'egressd')] }, { long: true });
    expect(fake.calls.filter((c) => /^(buffer|worker-buffer|file):/.test(c))).toEqual(['buffer:json', 'file:input.nft', 'worker-buffer:json']);
  });

  it('frees the context when nft refuses or the call throws', async () => {
    const refusing = fakeLibrary({ rc: -1, error: 'internal:0:0-0: Error: No such file or directory\n\n' });
    const client = new Nft(createLibnftablesBackend(refusing.api));
    const err = await client.addElements(dns4, ['192.0.2.1']).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(EgressError);
    expect((err as EgressError).code).toBe(ErrorCode.NftApply);
    expect((err as EgressError).message).toContain('add element inet egressd dns4 (1 element)');
    expect((err as EgressError).message).toContain('No such file or directory');
    expect((err as EgressError).details).toEqual(['internal:0:0-0: Error: No such file or directory']);
    expect(refusing.live.size).toBe(0);

    const throwing = fakeLibrary({ throwOnRun: true });
    await expect(new Nft(createLibnftablesBackend(throwing.api)).run({ text: 'x' })).rejects.toThrow('boom');
    expect(throwing.live.size).toBe(0);
  });

  it('does nothing for an empty element list', async () => {
    const fake = fakeLibrary();
    await new Nft(createLibnftablesBackend(fake.api)).addElements(dns4, []);
    expect(fake.made()).toBe(0);
  });
});
