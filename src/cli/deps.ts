import { parseArgs, type ParseArgsConfig } from 'node:util';
import type { Facts, FactsNeeded } from '../compile/compile.js';
import type { Nft } from '../nft/client.js';
import type { CapabilityProbe } from '../system/capabilities.js';
import { EgressError, ErrorCode, isEgressError } from '../errors.js';
import { formatIssue, sortIssues, type PolicyIssue } from '../policy/issues.js';
import { loadPolicyDir, type LoadedPolicy } from '../policy/load.js';

/** The I/O a command may do, passed in so tests can call `run` with fakes for output only. */
export interface Deps {
  /** Machine-readable output (`--json`, compiled rulesets, the schema). */
  readonly out: (text: string) => void;
  /** Text for people: results, errors, warnings. */
  readonly err: (text: string) => void;
  /** The machine's facts: the ids of the user and group names given (through NSS), and cgroups that deep. */
  readonly facts: (needed: FactsNeeded) => Facts;
  /** Opens the nftables binding (libnftables in-process, else the nft binary). */
  readonly nft: () => Promise<Nft>;
  /** Where the last good ruleset is kept. */
  readonly stateDir: string;
  /** Records a change of enforcement in the system log. */
  readonly audit: (event: string, fields: Readonly<Record<string, string | number | boolean>>) => void;
  /** Reads the capabilities of running processes and of systemd's units; absent, `check` and `status` do not look (fakes that test output only). */
  readonly capabilities?: CapabilityProbe;
  /** The running resolver's control socket (src/resolver/control.ts); absent, explain and status do not ask it. */
  readonly resolverSocket?: string;
  /** The clock an `allowed:` entry's `until` is judged by (plan, explain, check); default Date.now. */
  readonly now?: () => number;
}

/** Stable, documented exit codes. */
export const Exit = {
  Ok: 0,
  /** A "no" answer: `explain` says denied, `plan` says something differs. */
  Answer: 1,
  BadInput: 2,
  SystemError: 3,
} as const;

export const DEFAULT_POLICY_DIR = '/etc/egressd';
export const DEFAULT_STATE_DIR = '/var/lib/egressd';

/** Each code's exit status: bad policy or usage is the caller's to fix; everything else (nft, I/O, the lock, another writer) is the system's. */
const EXIT_FOR: { readonly [code in ErrorCode]: number } = {
  [ErrorCode.PolicyInvalid]: Exit.BadInput,
  [ErrorCode.Usage]: Exit.BadInput,
  [ErrorCode.Io]: Exit.SystemError,
  [ErrorCode.NftApply]: Exit.SystemError,
  [ErrorCode.NftUnavailable]: Exit.SystemError,
  [ErrorCode.NftState]: Exit.SystemError,
  [ErrorCode.Busy]: Exit.SystemError,
  [ErrorCode.ConcurrentChange]: Exit.SystemError,
  [ErrorCode.NameLookup]: Exit.SystemError,
  [ErrorCode.Netlink]: Exit.SystemError,
  [ErrorCode.SocketsNotCut]: Exit.SystemError,
  [ErrorCode.SocketNotFound]: Exit.SystemError,
  // Someone else's change to resolv.conf is not the system failing: a "no" the person decides on (--force).
  [ErrorCode.DnsConfigChanged]: Exit.Answer,
  [ErrorCode.NoUpstreams]: Exit.SystemError,
  [ErrorCode.ResolverStart]: Exit.SystemError,
  // Someone else's configuration in the way: left as it is, for the person to decide on.
  [ErrorCode.TorConflict]: Exit.Answer,
  [ErrorCode.TorMissing]: Exit.SystemError,
  [ErrorCode.DenialStore]: Exit.SystemError,
  [ErrorCode.DenialFilter]: Exit.BadInput,
  [ErrorCode.NotPermitted]: Exit.SystemError,
  // Refused by the daemon: a "no" answer, as explain's "denied" is.
  [ErrorCode.AccessDenied]: Exit.Answer,
  [ErrorCode.InvalidArgument]: Exit.BadInput,
  [ErrorCode.NotFound]: Exit.BadInput,
  [ErrorCode.NotAllowable]: Exit.Answer,
  [ErrorCode.DaemonUnavailable]: Exit.SystemError,
  [ErrorCode.Stopping]: Exit.SystemError,
};

export function exitCodeFor(error: unknown): number {
  return isEgressError(error) ? EXIT_FOR[error.code] : Exit.SystemError;
}

export interface Command<Options> {
  readonly name: string;
  readonly summary: string;
  readonly help: string;
  parse(argv: readonly string[]): Options;
  run(options: Options, deps: Deps): number | Promise<number>;
}

/** node:util parseArgs, with its errors turned into usage errors that name the command. */
export function parseFlags<T extends NonNullable<ParseArgsConfig['options']>>(command: string, argv: readonly string[], options: T, maxPositionals: number) {
  try {
    const parsed = parseArgs({ args: [...argv], options, allowPositionals: true, strict: true });
    if (parsed.positionals.length > maxPositionals) {
      throw new Error(`unexpected argument "${parsed.positionals[maxPositionals]}"`);
    }
    return parsed;
  } catch (error) {
    const message = (error as Error).message.replace(/\. To specify a positional argument.*$/s, '');
    throw new EgressError(ErrorCode.Usage, `egressctl ${command}: ${message}`, { details: [`see: egressctl ${command} --help`] });
  }
}

export function printIssues(deps: Deps, dir: string, issues: readonly PolicyIssue[]): void {
  for (const issue of sortIssues(issues)) deps.err(formatIssue(issue, dir));
}

/** Loads a policy directory, printing every problem; returns undefined when it is invalid. */
export function loadForCommand(dir: string, deps: Deps, quietWarnings = false): LoadedPolicy | undefined {
  const result = loadPolicyDir(dir);
  if (!result.ok) {
    printIssues(deps, dir, [...result.errors, ...result.warnings]);
    const n = result.errors.length;
    deps.err(`${dir}: ${n} ${n === 1 ? 'error' : 'errors'}; nothing was changed`);
    return undefined;
  }
  if (!quietWarnings) printIssues(deps, dir, result.warnings);
  return { dir, policy: result.policy, warnings: result.warnings };
}
