/**
 * The pure parts of src/nft: the model's commands rendered as the binding\n * sends them, element conversion, the guard every change passes, refusal\n * classification, and the libnftables backend's context discipline driven
 * through a fake C API (no kernel, no root).
 */
import { describe, expect, it } from 'vitest';
import { command, commandJson, describeCommand, EGRESSD_TABLE, renderCommandsText, verdict, type Ruleset } from '../../src/compile/ruleset.js';
import { EgressError, ErrorCode, NftRefusedError } from '../../src/errors.js';
import { classifyRefusal, Nft } from '../../src/nft/client.js';
import { batchDocument, list, toEntries } from '../../src/nft/commands.js';
import { elementsOf } from '../../src/nft/listing.js';
import { guardTransaction } from '../../src/nft/guard.js';
import { createLibnftablesBackend, NftOutputFlag, type LibnftablesApi, type NftCtx } from '../../src/nft/libnftables.js';

const dns4 = { table: EGRESSD_TABLE, name: 'dns4' };
const add = (elements: Parameters<typeof toEntries>[0], timeout?: number) => commandJson(command.addElements(dns4, toEntries(elements, timeout)));

describe('JSON commands', () => {
  it('build libnftables JSON with metainfo first', () => {
    const doc = JSON.parse(batchDocument([add(['192.0.2.1'], 30), list.tables()])) as unknown;
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
    const elem = (json: unknown) => (json as { add: { element: { elem: unknown } } }).add.element.elem;
    expect(
      elem(
        add(
          [
            '2001:db8::1',
            { prefix: { addr: '198.51.100.0', len: 24 } },
            7,
            { key: 'system.slice/foo.service', data: verdict.jump('app_foo') },
            { key: '192.0.2.9', data: verdict.drop(), timeout: 5, comment: 'x' },
            { key: '192.0.2.10' },
          ],
          60,
        ),
      ),
    ).toEqual([
      { elem: { val: '2001:db8::1', timeout: 60 } },
      { elem: { val: { prefix: { addr: '198.51.100.0', len: 24 } }, timeout: 60 } },
      { elem: { val: 7, timeout: 60 } },
      [{ elem: { val: 'system.slice/foo.service', timeout: 60 } }, { jump: { target: 'app_foo' } }],
      [{ elem: { val: '192.0.2.9', timeout: 5, comment: 'x' } }, { drop: null }],
      { elem: { val: '192.0.2.10', timeout: 60 } },
    ]);
    expect(elem(add(['192.0.2.1']))).toEqual(['192.0.2.1']);
  });

  it('send only keys on delete', () => {
    const json = commandJson(command.deleteElements(dns4, toEntries([{ key: '192.0.2.9', data: verdict.accept(), timeout: 5 }, '192.0.2.1'])));
    expect((json as { delete: { element: { elem: unknown } } }).delete.element.elem).toEqual(['192.0.2.9', '192.0.2.1']);
  });

  it('describe commands for error messages', () => {
    expect(describeCommand(command.addElements(dns4, toEntries(['192.0.2.1', '192.0.2.2'])))).toBe('add element inet egressd dns4 (2 elements)');
    expect(describeCommand(command.deleteTable(EGRESSD_TABLE))).toBe('delete table inet egressd');
    expect(describeCommand(command.createChain(EGRESSD_TABLE, 'app_x.a'))).toBe('create chain inet egressd app_x.a');
  });

  it('render a transaction as the nft text it is sent as', () => {
    const block: Ruleset = { table: EGRESSD_TABLE, sets: [], chains: [{ name: 'c.a', rules: [] }] };
    expect(
      renderCommandsText([
        command.flushChain(EGRESSD_TABLE, 'c.a'),
        command.deleteSet(EGRESSD_TABLE, 's.0123456789abcdef'),
        command.createChain(EGRESSD_TABLE, 'd.b'),
        command.block(block),
        command.addElements({ table: EGRESSD_TABLE, name: 'm' }, [{ key: 'system.slice/x.service', data: verdict.jump('d.b'), timeout: 60 }]),
      ]),
    ).toBe(
      'flush chain inet egressd c.a\ndelete set inet egressd s.0123456789abcdef\ncreate chain inet egressd d.b\ntable inet egressd {\n\tchain c.a {\n\t}\n}\nadd element inet egressd m { "system.slice/x.service" timeout 60s : jump d.b }\n',
    );
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

describe('the guard every change passes', () => {
  const refusal = (run: () => unknown): EgressError => {
    try {
      run();
    } catch (err) {
      expect(err).toBeInstanceOf(EgressError);
      expect((err as EgressError).code).toBe(ErrorCode.NftApply);
      expect((err as EgressError).message).toContain('nothing was sent to nft');
      return err as EgressError;
    }
    throw new Error('the guard let it through');
  };

  it('accepts commands that name only the owned table', () => {
    expect(() =>
      guardTransaction([command.createChain(EGRESSD_TABLE, 'app_x.a'), command.addElements(dns4, [{ key: '192.0.2.1', timeout: 5 }])], EGRESSD_TABLE),
    ).not.toThrow();
  });

  it.each([
    ['another table', command.flushChain({ family: 'inet', name: 'other' }, 'c')],
    ['another family', command.deleteTable({ family: 'ip', name: 'egressd' } as never)],
    ['a block of another table', command.block({ table: { family: 'inet', name: 'firewalld' }, sets: [], chains: [] })],
    ['elements of another table', command.addElements({ table: { family: 'inet', name: 'other' }, name: 'dns4' }, [{ key: '192.0.2.1' }])],
  ])('refuses %s, whatever comes before it', (_, foreign) => {
    const err = refusal(() => guardTransaction([command.createChain(EGRESSD_TABLE, 'ok.a'), foreign], EGRESSD_TABLE));
    expect(err.message).toContain('may touch only table inet egressd');
    expect(err.details).toEqual([`it holds: ${describeCommand(foreign)}`]);
  });

  it('refuses names that are not plain identifiers, and timeouts nft JSON cannot carry', () => {
    expect(refusal(() => guardTransaction([command.deleteChain(EGRESSD_TABLE, 'c; flush ruleset')], EGRESSD_TABLE)).message).toMatch(/identifier/);
    expect(
      refusal(() => guardTransaction([command.block({ table: EGRESSD_TABLE, sets: [], chains: [{ name: 'x }\nflush ruleset', rules: [] }] })], EGRESSD_TABLE))
        .message,
    ).toMatch(/identifier/);
    for (const bad of [0, -1, 1.5, Number.NaN]) {
      expect(refusal(() => guardTransaction([command.addElements(dns4, toEntries(['192.0.2.1'], bad))], EGRESSD_TABLE)).message).toMatch(
        /whole number of seconds/,
      );
    }
  });

  it('stops a transaction naming another table before nft is touched', async () => {
    const fake = fakeLibrary();
    const client = new Nft(createLibnftablesBackend(fake.api));
    await expect(client.run({ commands: [command.deleteTable({ family: 'inet', name: 'firewalld' })] })).rejects.toThrow(/may touch only table inet egressd/);
    await expect(client.addElements({ table: { family: 'inet', name: 'other' }, name: 'dns4' }, ['192.0.2.1'])).rejects.toThrow(/may touch only/);
    expect(fake.made()).toBe(0);
    // A client opened for another table guards that one instead.
    const bench = new Nft(createLibnftablesBackend(fake.api), { table: { family: 'inet', name: 'bench' } });
    await expect(bench.deleteTable()).resolves.toBeUndefined();
    await expect(bench.run({ commands: [command.deleteTable(EGRESSD_TABLE)] })).rejects.toThrow(/may touch only table inet bench/);
    expect(fake.made()).toBe(1);
  });
});

describe('refusal classification', () => {
  it.each([
    [['<input>:3:1-40: Error: Could not process rule: File exists', 'create chain inet egressd app_x.a'], 'conflict'],
    [['internal:0:0-0: Error: No such file or directory'], 'missing'],
    [['<input>:1:1-60: Error: cgroupv2 path fails: No such file or directory'], 'missing'],
    [['<input>:1:1-9: Error: Could not process rule: Operation not supported'], 'refused'],
    [['<input>:12:9-18: Error: syntax error, unexpected string'], 'refused'],
    [[], 'refused'],
    // nft echoes the refused input line: what it holds (a cgroup path a user named) is not the reason.
    [['<input>:4:20-50: Error: cgroupv2 path fails: No such file or directory', '  elements = { "user.slice/x File exists.scope" : drop }'], 'missing'],
    [['<input>:4:1-9: Error: syntax error, unexpected string', '  elements = { "a: File exists" : drop }'], 'refused'],
  ] as const)('reads %j as %s', (lines, reason) => {
    expect(classifyRefusal(lines)).toBe(reason);
  });

  it('puts the reason on the error, once, where nft answers', async () => {
    const refusing = fakeLibrary({ rc: -1, error: '<input>:2:1-30: Error: Could not process rule: File exists\n' });
    const err = await new Nft(createLibnftablesBackend(refusing.api))
      .run({ commands: [command.createChain(EGRESSD_TABLE, 'app_x.a')] })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NftRefusedError);
    expect((err as NftRefusedError).reason).toBe('conflict');
    expect((err as NftRefusedError).code).toBe(ErrorCode.NftApply);
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
    await client.run({ commands: [command.block({ table: EGRESSD_TABLE, sets: [], chains: [] })] });
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
    await client.run({ commands: [command.block({ table: EGRESSD_TABLE, sets: [], chains: [] })] }, { check: true });
    await client.run({ json: [list.tables()] }, { terse: true });
    expect(fake.calls).toContain('dry=true');
    expect(fake.calls).toContain(`flags=${NftOutputFlag.Json | NftOutputFlag.Terse}`);
  });

  it('runs short JSON commands on the event loop, and long ones (text, whole listings) on a worker', async () => {
    const fake = fakeLibrary();
    const client = new Nft(createLibnftablesBackend(fake.api));
    await client.addElements(dns4, ['192.0.2.1']);
    await client.run({ commands: [command.createChain(EGRESSD_TABLE, 'x')] });
    await client.run({ json: [list.table('inet', 'egressd')] }, { long: true });
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
    expect((err as NftRefusedError).reason).toBe('missing');
    expect(refusing.live.size).toBe(0);

    const throwing = fakeLibrary({ throwOnRun: true });
    await expect(new Nft(createLibnftablesBackend(throwing.api)).run({ commands: [command.createChain(EGRESSD_TABLE, 'x')] })).rejects.toThrow('boom');
    expect(throwing.live.size).toBe(0);
  });

  it('does nothing for an empty element list', async () => {
    const fake = fakeLibrary();
    await new Nft(createLibnftablesBackend(fake.api)).addElements(dns4, []);
    expect(fake.made()).toBe(0);
  });
});
