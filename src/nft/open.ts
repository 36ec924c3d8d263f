/**
 * The factory: picks libnftables in-process when it loads, else the `nft`
 * binary, and says which it picked (`nft.backend`) and why it fell back
 * (`nft.fallbackReason`). Both backends offer the same `Nft` interface.
 */
import type { TableRef } from '../compile/ruleset.js';
import { EgressError, ErrorCode } from '../errors.js';
import type { NftBackend, NftBackendKind } from './backend.js';
import { createBinaryBackend, DEFAULT_NFT_BINARY, probeBinaryVersion } from './binary.js';
import { Nft } from './client.js';
import { createLibnftablesBackend, DEFAULT_LIBRARY, loadLibnftables } from './libnftables.js';

export interface OpenNftOptions {
  /** Which backend to try first; the other is the fallback. Default 'libnftables'. */
  readonly prefer?: NftBackendKind;
  /** Forbid the fallback: fail with EGD_NFT_UNAVAILABLE if `prefer` is unavailable. */
  readonly strict?: boolean;
  /** The library to dlopen. Default 'libnftables.so.1'. */
  readonly libraryPath?: string;
  /** The `nft` executable. Default 'nft' on PATH. */
  readonly nftPath?: string;
  /** Where transactions that need a file (text in-process, all binary ones) get one. Default os.tmpdir(). */
  readonly tmpDir?: string;
  /** The only table the client may change; default `table inet egressd`. For tests and benchmarks on throwaway tables. */
  readonly table?: TableRef;
}

interface Opened {
  readonly backend: NftBackend;
  readonly version?: string;
}

async function openOne(kind: NftBackendKind, options: OpenNftOptions): Promise<Opened> {
  if (kind === 'libnftables') {
    const api = await loadLibnftables(options.libraryPath ?? DEFAULT_LIBRARY);
    return { backend: createLibnftablesBackend(api, options.tmpDir === undefined ? {} : { tmpDir: options.tmpDir }) };
  }
  const nftPath = options.nftPath ?? DEFAULT_NFT_BINARY;
  const version = await probeBinaryVersion(nftPath);
  return {
    backend: createBinaryBackend({ nftPath, ...(options.tmpDir === undefined ? {} : { tmpDir: options.tmpDir }) }),
    version,
  };
}

function reason(kind: NftBackendKind, err: unknown): string {
  return `${kind}: ${err instanceof Error ? err.message : String(err)}`;
}

export async function openNft(options: OpenNftOptions = {}): Promise<Nft> {
  const first = options.prefer ?? 'libnftables';
  const second: NftBackendKind = first === 'libnftables' ? 'binary' : 'libnftables';
  let firstFailure: string;
  try {
    const opened = await openOne(first, options);
    return new Nft(opened.backend, { ...(opened.version === undefined ? {} : { version: opened.version }), ...(options.table && { table: options.table }) });
  } catch (err) {
    firstFailure = reason(first, err);
    if (options.strict === true) {
      throw new EgressError(ErrorCode.NftUnavailable, `nftables backend unavailable: ${firstFailure}`, {
        details: [firstFailure],
        cause: err,
      });
    }
  }
  try {
    const opened = await openOne(second, options);
    return new Nft(opened.backend, {
      fallbackReason: firstFailure,
      ...(opened.version === undefined ? {} : { version: opened.version }),
      ...(options.table && { table: options.table }),
    });
  } catch (err) {
    const secondFailure = reason(second, err);
    throw new EgressError(ErrorCode.NftUnavailable, `neither libnftables nor the nft binary can be used: ${firstFailure}; ${secondFailure}`, {
      details: [firstFailure, secondFailure],
      cause: err,
    });
  }
}
