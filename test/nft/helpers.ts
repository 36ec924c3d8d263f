/**
 * Kernel-test plumbing for src/nft: throwaway network namespaces, the real
 * `nft` binary inside them, and the driver (./fixtures/driver.ts) run as a
 * child process inside them. The vitest worker itself never leaves the host
 * namespace and never touches the host's ruleset.
 */
import { execFileSync, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DEFAULT_LIBRARY, loadLibnftables } from '../../src/nft/libnftables.js';
import type { DriverOp, DriverOutput, DriverResult, DriverScript } from './fixtures/driver.js';

export type { DriverOp, DriverOutput, DriverResult, DriverScript };

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const DRIVER = join(REPO_ROOT, 'test/nft/fixtures/driver.ts');

function has(command: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${command}`], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Why kernel tests cannot run here, or null when they can. */
export function kernelSkipReason(): string | null {
  if (process.getuid?.() !== 0) return 'kernel nft tests need root (network namespaces)';
  for (const tool of ['ip', 'nsenter', 'nft', 'unshare']) {
    if (!has(tool)) return `kernel nft tests need ${tool} on PATH`;
  }
  return null;
}

/**
 * The library the libnftables tests load. EGD_TEST_LIBNFTABLES points them
 * at another path: one that does not exist shows how they skip on a host
 * without the library.
 */
export const LIBNFTABLES = process.env['EGD_TEST_LIBNFTABLES'] ?? DEFAULT_LIBRARY;

/** Why tests of the libnftables backend cannot run here (the library does not load), or null when they can. */
export async function libnftablesSkipReason(path: string = LIBNFTABLES): Promise<string | null> {
  try {
    await loadLibnftables(path);
    return null;
  } catch (error) {
    return `libnftables cannot be loaded here (${error instanceof Error ? error.message : String(error)})`;
  }
}

/** A fresh namespace name, unique per call so parallel test files never collide. */
export function netnsName(tag: string): string {
  return `egd-nft-${tag}-${randomBytes(4).toString('hex')}`;
}

export function addNetns(name: string): void {
  execFileSync('ip', ['netns', 'add', name]);
}

/** Removes the namespace if it exists; never throws (called from afterAll). */
export function deleteNetns(name: string): void {
  if (!existsSync(`/run/netns/${name}`)) return;
  try {
    execFileSync('ip', ['netns', 'delete', name], { stdio: 'ignore' });
  } catch {
    // Left behind only if the kernel refuses; nothing more a test can do.
  }
}

export function nsenterArgs(ns: string): string[] {
  return [`--net=/run/netns/${ns}`];
}

/** Runs the real nft binary inside the namespace; returns stdout. */
export function nft(ns: string, args: readonly string[], input?: string): string {
  return execFileSync('nsenter', [...nsenterArgs(ns), 'nft', ...args], {
    encoding: 'utf8',
    ...(input === undefined ? {} : { input }),
  });
}

/** The real nft's JSON listing, parsed. */
export function nftJson(ns: string, args: readonly string[]): { nftables: Record<string, unknown>[] } {
  return JSON.parse(nft(ns, ['-j', ...args])) as { nftables: Record<string, unknown>[] };
}

/** The driver command line, for tests that wrap it in a shell. */
export function driverCommand(): string[] {
  return [process.execPath, '--import', 'tsx', DRIVER];
}

/** `text` as one word for sh, whatever it contains. */
export function shellQuote(text: string): string {
  return `'${text.replaceAll("'", `'\\''`)}'`;
}

/** Deletes a table the test made, if it is there: a clean-up must not hide the test's own failure. */
export function deleteTableIfPresent(ns: string, family: string, name: string): void {
  try {
    nft(ns, ['delete', 'table', family, name]);
  } catch {
    // Not there: the test failed before making it, and says so itself.
  }
}

/** Spawns `argv` with `input` on stdin; resolves with stdout, rejects with stderr on failure. */
export function runChild(argv: readonly string[], input: string): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    const [file, ...args] = argv;
    if (file === undefined) throw new Error('runChild: empty argv');
    const child = spawn(file, args, { cwd: REPO_ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (chunk: Buffer) => out.push(chunk));
    child.stderr.on('data', (chunk: Buffer) => err.push(chunk));
    child.on('error', reject);
    child.on('close', (code) => {
      const stdout = Buffer.concat(out).toString('utf8');
      const stderr = Buffer.concat(err).toString('utf8');
      if (code === 0) resolvePromise(stdout);
      else reject(new Error(`${argv.join(' ')} exited ${String(code)}:\n${stderr}\n${stdout}`));
    });
    child.stdin.end(input);
  });
}

/** Runs a driver script inside the namespace. */
export async function drive(ns: string, script: DriverScript): Promise<DriverOutput> {
  const stdout = await runChild(['nsenter', ...nsenterArgs(ns), ...driverCommand()], JSON.stringify(script));
  return JSON.parse(stdout) as DriverOutput;
}

export const op = (name: string, ...args: unknown[]): DriverOp => ({ op: name, args });

/** The value of a successful result; fails the test with nft's message otherwise. */
export function ok(result: DriverResult | undefined): unknown {
  if (result === undefined) throw new Error('driver returned fewer results than ops');
  if (!result.ok) throw new Error(`expected success, got ${result.error.code ?? 'error'}: ${result.error.message}`);
  return result.value;
}

export function failed(result: DriverResult | undefined): { code: string | null; reason: string | null; message: string; details: readonly string[] } {
  if (result === undefined) throw new Error('driver returned fewer results than ops');
  if (result.ok) throw new Error(`expected failure, got success: ${JSON.stringify(result.value)}`);
  return result.error;
}

/** The `elem` list of the first set/map in a real-nft JSON listing. */
export function listedElems(listing: { nftables: Record<string, unknown>[] }): unknown[] {
  for (const item of listing.nftables) {
    const obj = (item['set'] ?? item['map']) as { elem?: unknown[] } | undefined;
    if (obj !== undefined) return obj.elem ?? [];
  }
  return [];
}
