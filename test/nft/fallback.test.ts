/**
 * openNft's choice of backend: libnftables when it loads, else the `nft`
 * binary with the same interface; a clear EGD_NFT_UNAVAILABLE when neither
 * can be used. libnftables is made unavailable by pointing the factory at a
 * library that does not exist.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EgressError, ErrorCode } from '../../src/errors.js';
import { openNft } from '../../src/nft/open.js';
import type { NftSetInfo } from '../../src/nft/types.js';
import { addNetns, deleteNetns, drive, kernelSkipReason, libnftablesSkipReason, listedElems, netnsName, nft, nftJson, ok, op } from './helpers.js';

const NO_LIBRARY = '/nonexistent/libnftables.so.1';
const NO_BINARY = '/nonexistent/nft';
const skipReason = kernelSkipReason();
const libSkipReason = await libnftablesSkipReason();

describe('openNft', () => {
  it('says why libnftables tests skip where the library cannot be loaded', async () => {
    expect(await libnftablesSkipReason(NO_LIBRARY)).toMatch(
      new RegExp(`^libnftables cannot be loaded here \\(cannot load ${NO_LIBRARY.replaceAll('.', '\\.')}: `),
    );
  });

  it.skipIf(libSkipReason !== null)(`picks libnftables by default${libSkipReason ? ` (skipped: ${libSkipReason})` : ''}`, async () => {
    const client = await openNft();
    expect(client.backend).toBe('libnftables');
    expect(client.fallbackReason).toBeUndefined();
  });

  it('falls back to the nft binary when libnftables cannot be loaded, and says why', async () => {
    const client = await openNft({ libraryPath: NO_LIBRARY });
    expect(client.backend).toBe('binary');
    expect(client.fallbackReason).toMatch(/^libnftables: /);
    expect(client.fallbackReason).toContain(NO_LIBRARY);
    expect(await client.version()).toMatch(/^\d+\.\d+\.\d+$/);
  });

  it.skipIf(libSkipReason !== null)(
    `falls back to libnftables when the preferred binary is missing${libSkipReason ? ` (skipped: ${libSkipReason})` : ''}`,
    async () => {
      const client = await openNft({ prefer: 'binary', nftPath: NO_BINARY });
      expect(client.backend).toBe('libnftables');
      expect(client.fallbackReason).toContain(NO_BINARY);
    },
  );

  it('refuses to fall back in strict mode, and fails clearly when nothing is usable', async () => {
    const strict = await openNft({ libraryPath: NO_LIBRARY, strict: true }).catch((e: unknown) => e);
    expect(strict).toBeInstanceOf(EgressError);
    expect((strict as EgressError).code).toBe(ErrorCode.NftUnavailable);

    const none = await openNft({ libraryPath: NO_LIBRARY, nftPath: NO_BINARY }).catch((e: unknown) => e);
    expect(none).toBeInstanceOf(EgressError);
    expect((none as EgressError).code).toBe(ErrorCode.NftUnavailable);
    expect((none as EgressError).details).toHaveLength(2);
  });
});

describe.skipIf(skipReason !== null)('the fallback backend against the kernel', () => {
  const ns = netnsName('fb');
  beforeAll(() => {
    addNetns(ns);
  });
  afterAll(() => {
    deleteNetns(ns);
  });

  it('applies, adds and lists through the binary when libnftables is unavailable', async () => {
    const table = { family: 'inet', name: 'egd' } as const;
    const ref = { table, name: 'dns4' };
    const out = await drive(ns, {
      open: { libraryPath: NO_LIBRARY, table },
      ops: [
        op('replaceTable', { table, sets: [{ name: 'dns4', key: 'ipv4_addr', flags: ['timeout'], elements: [] }], chains: [] }),
        op('addElements', ref, ['192.0.2.1', '192.0.2.2'], { timeout: 90 }),
        op('deleteElements', ref, ['192.0.2.2']),
        op('listSet', ref),
      ],
    });
    expect(out.backend).toBe('binary');
    expect(out.fallbackReason).toContain(NO_LIBRARY);
    ok(out.results[0]);
    ok(out.results[1]);
    ok(out.results[2]);
    expect((ok(out.results[3]) as NftSetInfo).elem).toEqual([{ elem: { val: '192.0.2.1', timeout: 90, expires: expect.any(Number) as number } }]);
    expect(listedElems(nftJson(ns, ['list', 'set', 'inet', 'egd', 'dns4']))).toEqual([
      { elem: { val: '192.0.2.1', timeout: 90, expires: expect.any(Number) as number } },
    ]);
    expect(nft(ns, ['list', 'tables'])).toBe('table inet egd\n');
  });
});
