import { readdirSync, statSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { EgressError, ErrorCode } from '../errors.js';
import { formatIssue, sortIssues, type PolicyIssue } from './issues.js';
import type { Policy } from './model.js';
import { MAX_POLICY_FILE_BYTES, oversizeIssue } from './source.js';
import { resolvePolicy, type ListReader, type PolicyFileInput, type ResolveResult } from './resolve.js';
import { PathTrust, trustedOwners } from './trust.js';

/** List files may be large (the tracking list is ~4 MB); past this they are refused rather than read. */
export const MAX_LIST_FILE_BYTES = 64 * 1024 * 1024;

const POLICY_FILE_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,58}\.ya?ml$/;

export interface LoadedPolicy {
  readonly dir: string;
  readonly policy: Policy;
  readonly warnings: readonly PolicyIssue[];
}

/**
 * Reads every *.yaml / *.yml file of `dir` in lexical (byte) order, like
 * systemd drop-ins, and resolves them into one Policy.
 *
 * `replace`: files taken as if they were in `dir` with these bytes (null: as
 * if absent) — a drop-in is checked with the whole policy before it is written.
 *
 * The directory, each file and each list file must be writable by no one but
 * `owners` (trust.ts): root, and whoever runs egressctl when not root.
 */
export function loadPolicyDir(
  dir: string,
  replace: ReadonlyMap<string, Uint8Array | null> = new Map(),
  owners: readonly number[] = trustedOwners(),
): ResolveResult & { dir: string } {
  const trust = new PathTrust(owners);
  let names: string[];
  try {
    if (!statSync(dir).isDirectory()) throw new Error('not a directory');
    const problem = trust.checkDirectory(dir);
    if (problem !== undefined) return { ok: false, errors: [{ severity: 'error', at: { file: dir, line: 1, col: 1 }, message: problem }], warnings: [], dir };
    names = readdirSync(dir, { withFileTypes: true })
      .filter((entry) => (entry.isFile() || entry.isSymbolicLink()) && /\.ya?ml$/.test(entry.name) && !entry.name.startsWith('.'))
      .map((entry) => entry.name)
      .filter((name) => !replace.has(name))
      .concat([...replace].filter(([, bytes]) => bytes !== null).map(([name]) => name))
      .sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  } catch (error) {
    throw new EgressError(ErrorCode.Io, `cannot read policy directory ${dir}: ${(error as Error).message}`, { cause: error });
  }

  const files: PolicyFileInput[] = [];
  const unreadable: PolicyIssue[] = [];
  for (const file of names) {
    // File names end up in rule ids, log prefixes and comments in the kernel.
    if (!POLICY_FILE_NAME.test(file)) {
      unreadable.push({
        severity: 'error',
        at: { file, line: 1, col: 1 },
        message: 'unusable policy file name',
        hint: 'use letters, digits, ".", "_" and "-", at most 64 characters, e.g. 90-local.yaml',
      });
      continue;
    }
    try {
      const replaced = replace.get(file);
      if (replaced) {
        files.push({ file, bytes: replaced });
        continue;
      }
      // An oversized file is refused by its size, without reading it.
      const read = trust.read(join(dir, file), MAX_POLICY_FILE_BYTES);
      if ('tooBig' in read) unreadable.push(oversizeIssue(file, read.tooBig));
      else if ('error' in read) unreadable.push({ severity: 'error', at: { file, line: 1, col: 1 }, message: read.error });
      else files.push({ file, bytes: read.bytes });
    } catch (error) {
      unreadable.push({
        severity: 'error',
        at: { file, line: 1, col: 1 },
        message: `cannot read file: ${(error as NodeJS.ErrnoException).code ?? (error as Error).message}`,
      });
    }
  }
  const readList: ListReader = (path) => {
    const full = isAbsolute(path) ? path : resolve(dir, path);
    try {
      const read = trust.read(full, MAX_LIST_FILE_BYTES);
      if ('tooBig' in read) return { error: `file is ${read.tooBig} bytes; list files are at most ${MAX_LIST_FILE_BYTES}` };
      return read;
    } catch (error) {
      return { error: (error as NodeJS.ErrnoException).code ?? (error as Error).message };
    }
  };
  if (unreadable.length > 0 && files.length === 0) return { ok: false, errors: unreadable, warnings: [], dir };
  const result = resolvePolicy(files, readList);
  if (unreadable.length > 0) {
    return { ok: false, errors: [...unreadable, ...(result.ok ? [] : result.errors)], warnings: result.warnings, dir };
  }
  return { ...result, dir };
}

/** Loads or throws EGD_POLICY_INVALID with every problem formatted as file:line:col. */
export function loadPolicyOrThrow(dir: string): LoadedPolicy {
  const result = loadPolicyDir(dir);
  if (!result.ok) {
    const details = sortIssues([...result.errors, ...result.warnings]).map((issue) => formatIssue(issue, dir));
    const count = result.errors.length;
    throw new EgressError(ErrorCode.PolicyInvalid, `${dir}: ${count} ${count === 1 ? 'error' : 'errors'} in the policy; nothing was changed`, { details });
  }
  return { dir, policy: result.policy, warnings: result.warnings };
}
