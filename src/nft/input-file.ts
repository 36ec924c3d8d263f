/**
 * A transaction's input as a private temporary file, for the two places that
 * must hand nft a file name rather than a buffer or a stream:
 *
 * - libnftables text: nftables 1.0.6 reports an error in a multi-line
 *   *buffer* against the buffer's first line (the caret lands under the wrong
 *   text); in a *file* it names the right line, as `nft -f` does.
 * - the `nft` binary: Node gives a child a socket, not a pipe, as stdin, and
 *   `nft -j -f -` (which opens /dev/stdin) fails on a socket with ENXIO.
 *
 * The file lives in a fresh 0700 directory and is removed afterwards, even
 * on failure. nft's messages name it; `relabel` puts `<input>` in its place.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Stands in for the temporary file's path in nft's messages. */
export const INPUT_LABEL = '<input>';

export interface InputFile {
  readonly path: string;
  /** Replaces the file's path in nft's text with INPUT_LABEL. */
  relabel(text: string): string;
}

export async function withInputFile<T>(tmpBase: string | undefined, input: string, use: (file: InputFile) => T | Promise<T>): Promise<T> {
  const dir = mkdtempSync(join(tmpBase ?? tmpdir(), 'egressd-nft-'));
  try {
    const path = join(dir, 'input.nft');
    writeFileSync(path, input, { mode: 0o600 });
    return await use({ path, relabel: (text) => text.split(path).join(INPUT_LABEL) });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
