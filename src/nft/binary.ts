/**
 * The fallback: one `nft` process per transaction (`nft -f FILE`, `-j` for
 * JSON, `-c` to check, `-t` for terse listings). Costs ≈ 5–7 ms per call in
 * process start-up; otherwise the same transactions and the same answers as
 * libnftables.
 *
 * The input goes in a private temporary file, not on stdin: Node hands a
 * child a socket, not a pipe, and `nft -j -f -` cannot open /dev/stdin on a
 * socket (ENXIO). See ./input-file.ts.
 */
import { spawn } from 'node:child_process';
import { EgressError, ErrorCode } from '../errors.js';
import type { NftBackend, NftOutcome, NftRequest } from './backend.js';
import { withInputFile } from './input-file.js';

export const DEFAULT_NFT_BINARY = 'nft';

export interface BinaryBackendOptions {
  /** The `nft` executable; a bare name is looked up on PATH. */
  readonly nftPath?: string;
  /** Where the private directory for each transaction's input is made; default os.tmpdir(). */
  readonly tmpDir?: string;
}

interface ProcessResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

function runProcess(file: string, args: readonly string[]): Promise<ProcessResult> {
  return new Promise((resolve, reject) => {
    // nft's refusals are classified by the strerror text it prints (client.ts): keep it untranslated.
    const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, LC_ALL: 'C' } });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => err.push(chunk));
    child.on('error', (cause) => {
      reject(new EgressError(ErrorCode.NftUnavailable, `could not run ${file}: ${cause.message}`, { cause }));
    });
    child.on('close', (code, signal) => {
      resolve({
        code,
        signal,
        stdout: Buffer.concat(out).toString('utf8'),
        stderr: Buffer.concat(err).toString('utf8'),
      });
    });
  });
}

export function createBinaryBackend(options: BinaryBackendOptions = {}): NftBackend {
  const nftPath = options.nftPath ?? DEFAULT_NFT_BINARY;
  return {
    kind: 'binary',
    async exec(request: NftRequest): Promise<NftOutcome> {
      return withInputFile(options.tmpDir, request.input, async (file) => {
        const args = [...(request.format === 'json' ? ['-j'] : []), ...(request.check ? ['-c'] : []), ...(request.terse ? ['-t'] : []), '-f', file.path];
        const result = await runProcess(nftPath, args);
        const killed = result.signal === null ? '' : `${nftPath} was killed by ${result.signal}\n`;
        return { ok: result.code === 0, output: result.stdout, error: killed + file.relabel(result.stderr) };
      });
    },
  };
}

/**
 * Runs `nft --version` and returns the version number ("1.0.6"). Throws
 * EGD_NFT_UNAVAILABLE when the binary is missing or answers oddly.
 */
export async function probeBinaryVersion(nftPath: string = DEFAULT_NFT_BINARY): Promise<string> {
  const result = await runProcess(nftPath, ['--version']);
  const match = /v(\d+(?:\.\d+)+)/.exec(result.stdout);
  if (result.code !== 0 || match?.[1] === undefined) {
    throw new EgressError(
      ErrorCode.NftUnavailable,
      `${nftPath} --version failed (exit ${String(result.code)}): ${result.stderr.trim() || result.stdout.trim()}`,
    );
  }
  return match[1];
}
