/**
 * libnftables (libnftables.so.1) in-process, through koffi.
 *
 * Every transaction gets a FRESH `nft_ctx`, freed in a `finally`. A context
 * keeps a cache of the ruleset; reused across transactions, that cache goes
 * stale after every change and is refetched, with set elements once a
 * listing has asked for them (measured here: the next element add into a
 * 50,000-element hash set ≈ 30–50 ms instead of ≈ 0.3 ms; reported
 * elsewhere ≈ 1.25 s at 100,000). A fresh context fetches only what the
 * command needs, so one element add costs ≈ 0.1–0.3 ms.
 *
 * Not fixable here (nftables 1.0.6): an element add fetches the elements of
 * every INTERVAL set in the namespace, in any table, fresh context or not —
 * ≈ 32 ms per add with a 20,000-element interval set present, ≈ 0.85 s at
 * 100,000. Keep interval sets small where run-time adds must be fast.
 *
 * Time and threads: short JSON commands (element adds, name listings) run
 * on the event-loop thread — they take well under a millisecond, and a
 * worker thread's hand-off would cost more than the call. Long ones — text
 * transactions (a whole generation of the table: ≈ 1 s at 100,000 interval
 * elements) and listings with every element (≈ 1–2 s) — run on a worker
 * thread, so that a daemon keeps answering (DNS, D-Bus) while an apply is in
 * the kernel, and an apply can prepare its state files meanwhile. Their
 * contexts are freed there too: after a commit, closing a context's socket
 * waits for the kernel's clean-up of it. libnftables is not documented as
 * safe to drive from several threads at once (nft_ctx_free releases a
 * process-wide interface cache, for one): calls never overlap, because a
 * process has one client (client.ts), which runs them one at a time.
 *
 * Text transactions go through a private temporary file
 * (`nft_run_cmd_from_filename`, see ./input-file.ts) so that nft's errors
 * name the right line; JSON goes through `nft_run_cmd_from_buffer`.
 */
import { inspect } from 'node:util';
import { EgressError, ErrorCode } from '../errors.js';
import type { NftBackend, NftOutcome, NftRequest } from './backend.js';
import { withInputFile } from './input-file.js';

/** Output flags from <nftables/libnftables.h>. */
export const NftOutputFlag = {
  ReverseDns: 1 << 0,
  Service: 1 << 1,
  Stateless: 1 << 2,
  Handle: 1 << 3,
  Json: 1 << 4,
  Echo: 1 << 5,
  Guid: 1 << 6,
  NumericProto: 1 << 7,
  NumericPrio: 1 << 8,
  NumericSymbol: 1 << 9,
  NumericTime: 1 << 10,
  Terse: 1 << 11,
} as const;

/** An `struct nft_ctx *` as koffi hands it back; opaque to JavaScript. */
export type NftCtx = { readonly __brand: 'nft_ctx' };

/** The C functions egressd uses, typed. Tests may substitute a fake. */
export interface LibnftablesApi {
  ctxNew(flags: number): NftCtx | null;
  ctxFree(ctx: NftCtx): void;
  /** The same on a worker thread. */
  ctxFreeAsync(ctx: NftCtx): Promise<void>;
  bufferOutput(ctx: NftCtx): number;
  bufferError(ctx: NftCtx): number;
  getOutputBuffer(ctx: NftCtx): string | null;
  getErrorBuffer(ctx: NftCtx): string | null;
  outputGetFlags(ctx: NftCtx): number;
  outputSetFlags(ctx: NftCtx, flags: number): void;
  setDryRun(ctx: NftCtx, dry: boolean): void;
  runCmdFromBuffer(ctx: NftCtx, buffer: string): number;
  /** The same on a worker thread (koffi's async call). */
  runCmdFromBufferAsync(ctx: NftCtx, buffer: string): Promise<number>;
  /** Runs on a worker thread. */
  runCmdFromFilename(ctx: NftCtx, filename: string): Promise<number>;
}

export const DEFAULT_LIBRARY = 'libnftables.so.1';

/**
 * dlopens libnftables and binds its functions. Throws (with koffi's or the
 * loader's reason) when koffi or the library or a symbol is missing; the
 * factory turns that into a fallback to the `nft` binary.
 */
export async function loadLibnftables(path: string = DEFAULT_LIBRARY): Promise<LibnftablesApi> {
  // Imported here, not at the top: a koffi without a native build for this
  // platform must mean "use the binary", not "this module cannot load".
  const koffi = (await import('koffi')).default;
  let lib: ReturnType<typeof koffi.load>;
  try {
    lib = koffi.load(path);
  } catch (cause) {
    throw new EgressError(ErrorCode.NftUnavailable, `cannot load ${path}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
  }
  const ctxPtr = koffi.pointer(koffi.opaque());
  const fn = (name: string, result: string | typeof ctxPtr, args: (string | typeof ctxPtr)[]) => lib.func(name, result, args);

  const ctxNew = fn('nft_ctx_new', ctxPtr, ['uint32_t']);
  const ctxFree = fn('nft_ctx_free', 'void', [ctxPtr]);
  const bufferOutput = fn('nft_ctx_buffer_output', 'int', [ctxPtr]);
  const bufferError = fn('nft_ctx_buffer_error', 'int', [ctxPtr]);
  const getOutputBuffer = fn('nft_ctx_get_output_buffer', 'const char *', [ctxPtr]);
  const getErrorBuffer = fn('nft_ctx_get_error_buffer', 'const char *', [ctxPtr]);
  const outputGetFlags = fn('nft_ctx_output_get_flags', 'unsigned int', [ctxPtr]);
  const outputSetFlags = fn('nft_ctx_output_set_flags', 'void', [ctxPtr, 'unsigned int']);
  const setDryRun = fn('nft_ctx_set_dry_run', 'void', [ctxPtr, 'bool']);
  const runCmdFromBuffer = fn('nft_run_cmd_from_buffer', 'int', [ctxPtr, 'const char *']);
  const runCmdFromFilename = fn('nft_run_cmd_from_filename', 'int', [ctxPtr, 'const char *']);

  return {
    ctxNew: (flags) => ctxNew(flags) as NftCtx | null,
    ctxFree: (ctx) => {
      ctxFree(ctx);
    },
    ctxFreeAsync: async (ctx) => {
      await onWorker(ctxFree, ctx);
    },
    bufferOutput: (ctx) => bufferOutput(ctx) as number,
    bufferError: (ctx) => bufferError(ctx) as number,
    getOutputBuffer: (ctx) => getOutputBuffer(ctx) as string | null,
    getErrorBuffer: (ctx) => getErrorBuffer(ctx) as string | null,
    outputGetFlags: (ctx) => outputGetFlags(ctx) as number,
    outputSetFlags: (ctx, flags) => {
      outputSetFlags(ctx, flags);
    },
    setDryRun: (ctx, dry) => {
      setDryRun(ctx, dry);
    },
    runCmdFromBuffer: (ctx, buffer) => runCmdFromBuffer(ctx, buffer) as number,
    runCmdFromBufferAsync: (ctx, buffer) => onWorker(runCmdFromBuffer, ctx, buffer),
    runCmdFromFilename: (ctx, filename) => onWorker(runCmdFromFilename, ctx, filename),
  };
}

/** Calls a koffi function on a worker thread. */
function onWorker(fn: { async: (...args: unknown[]) => void }, ...args: unknown[]): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    fn.async(...args, (err: unknown, rc: number) => (err ? reject(err instanceof Error ? err : new Error(inspect(err))) : resolve(rc)));
  });
}

export interface LibnftablesBackendOptions {
  /** Where the private directory for text transactions is made; default os.tmpdir(). */
  readonly tmpDir?: string;
}

export function createLibnftablesBackend(api: LibnftablesApi, options: LibnftablesBackendOptions = {}): NftBackend {
  const tmpBase = options.tmpDir;

  async function execOne(request: NftRequest): Promise<NftOutcome> {
    const ctx = api.ctxNew(0);
    if (ctx === null) {
      throw new EgressError(ErrorCode.NftUnavailable, 'libnftables: nft_ctx_new failed');
    }
    const offLoop = request.format !== 'json' || request.long === true;
    try {
      if (api.bufferOutput(ctx) !== 0 || api.bufferError(ctx) !== 0) {
        throw new EgressError(ErrorCode.NftUnavailable, 'libnftables: could not buffer output');
      }
      let flags = api.outputGetFlags(ctx);
      if (request.format === 'json') flags |= NftOutputFlag.Json;
      if (request.terse) flags |= NftOutputFlag.Terse;
      api.outputSetFlags(ctx, flags);
      if (request.check) api.setDryRun(ctx, true);

      if (request.format === 'json') {
        const rc = offLoop ? await api.runCmdFromBufferAsync(ctx, request.input) : api.runCmdFromBuffer(ctx, request.input);
        return outcome(rc, api.getOutputBuffer(ctx), api.getErrorBuffer(ctx));
      }
      return await withInputFile(tmpBase, request.input, async (file) => {
        const rc = await api.runCmdFromFilename(ctx, file.path);
        return outcome(rc, api.getOutputBuffer(ctx), file.relabel(api.getErrorBuffer(ctx) ?? ''));
      });
    } finally {
      // 13–24 ms measured after an apply's transactions: off the event loop, like the transaction.
      // A failed hand-off must not turn a committed transaction into an error; a context is
      // leaked then rather than risk freeing it twice.
      if (offLoop) await api.ctxFreeAsync(ctx).catch(() => undefined);
      else api.ctxFree(ctx);
    }
  }

  return { kind: 'libnftables', exec: execOne };
}

function outcome(rc: number, output: string | null, error: string | null): NftOutcome {
  return { ok: rc === 0, output: output ?? '', error: error ?? '' };
}
