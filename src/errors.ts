/**
 * One registry of error codes. Callers match on `code`, never on a message:
 * the CLI maps codes to exit codes and D-Bus maps them to error names, each in
 * one place.
 */
export const ErrorCode = {
  /** The policy directory has problems; `details` lists every one with its location. */
  PolicyInvalid: 'EGD_POLICY_INVALID',
  /** A file or directory could not be read. */
  Io: 'EGD_IO',
  /** Command-line usage was wrong. */
  Usage: 'EGD_USAGE',
  /** nftables refused a transaction (nothing was changed). */
  NftApply: 'EGD_NFT_APPLY',
  /** libnftables could not be loaded and the nft binary is missing too. */
  NftUnavailable: 'EGD_NFT_UNAVAILABLE',
  /** The live table is not what egressd expected to find. */
  NftState: 'EGD_NFT_STATE',
  /** Another change of enforcement held the lock for too long (nothing was changed). */
  Busy: 'EGD_BUSY',
  /**
   * Something else changed the table while this change ran, without the
   * lock (nft by hand, or an egressd that could not take it): this change
   * was refused and left the policy in force as it was. Not the policy's fault.
   */
  ConcurrentChange: 'EGD_CONCURRENT_CHANGE',
  /**
   * A user or group name the policy uses could not be looked up: the name
   * service failed, so whether its rules would match is unknown. Not the
   * policy's text at fault, but it cannot be applied here now (nothing was changed).
   */
  NameLookup: 'EGD_NAME_LOOKUP',
  /** A netlink request to the kernel failed, or its answer could not be read. */
  Netlink: 'EGD_NETLINK',
  /**
   * The policy was applied and stays in force, but connections of
   * identities it denies could not all be cut (sock_diag): data such a
   * connection queued may still leave once its program closes it.
   */
  SocketsNotCut: 'EGD_SOCKETS_NOT_CUT',
  /**
   * The socket a DNS query came from is not in this network namespace (it
   * closed, or the query came from another host): who asked is unknown, so
   * the resolver refuses it.
   */
  SocketNotFound: 'EGD_SOCKET_NOT_FOUND',
  /**
   * What `egressctl dns enable` wrote (resolv.conf, the systemd-resolved
   * drop-in) was changed by someone else since (NetworkManager, dhclient, a
   * person): it was left as they left it; `--force` overrides.
   */
  DnsConfigChanged: 'EGD_DNS_CONFIG_CHANGED',
  /** The resolver has no upstream server: the policy names none and the machine's own resolver configuration has none usable. */
  NoUpstreams: 'EGD_NO_UPSTREAMS',
  /** The DNS resolver could not start: an address to listen on, an upstream, or the socket mark (`reason` says which). */
  ResolverStart: 'EGD_RESOLVER_START',
  /**
   * `egressctl tor enable` found configuration of someone else's in its way
   * (an apt proxy, a file of the name it writes, a later policy file
   * overriding `tor`, the SOCKS port held by something that is not Tor):
   * it was reported, not overwritten, and nothing was changed.
   */
  TorConflict: 'EGD_TOR_CONFLICT',
  /** Tor is not installed (no tor binary in the system image), so updates over Tor would have nothing to go through. */
  TorMissing: 'EGD_TOR_MISSING',
  /** The denial store (SQLite) could not be opened, read or written, or was damaged (then kept aside and a fresh one started); enforcement is not affected. */
  DenialStore: 'EGD_DENIAL_STORE',
  /** A denial query's filter is wrong; `details[0]` names the field (since, until, app, dest, rule, uid, limit, id). */
  DenialFilter: 'EGD_DENIAL_FILTER',
  /** The caller may not do this (denial records: root and group egressd-audit only). */
  NotPermitted: 'EGD_NOT_PERMITTED',
  /** The caller may not do this (D-Bus: org.egressd.Firewall1.Error.AccessDenied): decided from its credentials on the bus, never from its arguments. */
  AccessDenied: 'EGD_ACCESS_DENIED',
  /** An argument of a request is malformed or out of range (`details` name the field). */
  InvalidArgument: 'EGD_INVALID_ARGUMENT',
  /** What a request names (a denial record) does not exist, or no longer. */
  NotFound: 'EGD_NOT_FOUND',
  /** A denial no allow can undo: a system domain, lockdown, Tor's confinement, or a sender in no app. */
  NotAllowable: 'EGD_NOT_ALLOWABLE',
  /** egressd's D-Bus service could not be reached (the daemon is not running, or no system bus). */
  DaemonUnavailable: 'EGD_DAEMON_UNAVAILABLE',
  /** egressd is stopping: a reload asked for now is not applied (the rules in force stay). */
  Stopping: 'EGD_STOPPING',
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export class EgressError extends Error {
  readonly code: ErrorCode;
  readonly details: readonly string[];

  constructor(code: ErrorCode, message: string, options: { details?: readonly string[]; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'EgressError';
    this.code = code;
    this.details = options.details ?? [];
  }
}

export function isEgressError(value: unknown): value is EgressError {
  return value instanceof EgressError;
}

/**
 * Why nft refused a transaction, classified once where nft answers
 * (src/nft/client.ts) so that no caller reads nft's message text:
 * - conflict: an object it creates is there already (EEXIST) — written by someone else meanwhile;
 * - missing: an object or cgroup it names is not there (ENOENT);
 * - refused: anything else the kernel or nft's parser turned down.
 */
export type NftRefusal = 'conflict' | 'missing' | 'refused';

/** nftables refused a transaction (code EGD_NFT_APPLY); nothing was changed. */
export class NftRefusedError extends EgressError {
  readonly reason: NftRefusal;

  constructor(reason: NftRefusal, message: string, options: { details?: readonly string[]; cause?: unknown } = {}) {
    super(ErrorCode.NftApply, message, options);
    this.name = 'NftRefusedError';
    this.reason = reason;
  }
}

/** The reason nft gave for refusing, when `value` is such a refusal. */
export function nftRefusal(value: unknown): NftRefusal | undefined {
  return value instanceof NftRefusedError ? value.reason : undefined;
}

/**
 * Why the kernel refused a set element write (src/nft/set-elements.ts),
 * classified once where the kernel answers; nothing of that transaction was
 * written:
 * - missing-set: a set it names is not in the table (a re-apply renamed it: re-read the live names);
 * - missing-table: the table itself is not there (released, or not applied yet);
 * - permission: this process may not change nftables here (CAP_NET_ADMIN in its network namespace);
 * - invalid: something the set cannot take (an address of the other family, a set without
 *   timeouts), or a write refused before it was sent (a bad name, address or timeout);
 * - full: the set holds as many elements as its size allows;
 * - other: anything else the kernel turned down.
 */
export type SetWriteRefusal = 'missing-set' | 'missing-table' | 'permission' | 'invalid' | 'full' | 'other';

/** A set element write was refused (code EGD_NFT_APPLY); nothing of its transaction was written. */
export class SetWriteRefusedError extends EgressError {
  readonly reason: SetWriteRefusal;
  /** The set the refused message named, when the refusal is about one. */
  readonly set: string | undefined;
  /** The kernel's errno (positive); undefined when the write was refused before it was sent. */
  readonly errno: number | undefined;

  constructor(reason: SetWriteRefusal, message: string, options: { set?: string; errno?: number; details?: readonly string[] } = {}) {
    super(ErrorCode.NftApply, message, options.details === undefined ? {} : { details: options.details });
    this.name = 'SetWriteRefusedError';
    this.reason = reason;
    this.set = options.set;
    this.errno = options.errno;
  }
}

/** The reason a set element write was refused, when `value` is such a refusal. */
export function setWriteRefusal(value: unknown): SetWriteRefusal | undefined {
  return value instanceof SetWriteRefusedError ? value.reason : undefined;
}

/**
 * Why the resolver could not start: `listen` (an address could not be bound), `upstream` (an upstream is not "ADDR" or "ADDR#PORT"),
 * `mark` (SO_MARK refused: no CAP_NET_ADMIN), `unit-allow` (egressd's unit denies addresses and would not let the upstreams through).
 */
export type ResolverStartFailure = 'listen' | 'upstream' | 'mark' | 'unit-allow';

/** The resolver could not start (code EGD_RESOLVER_START); nothing of it is left running. */
export class ResolverStartError extends EgressError {
  readonly reason: ResolverStartFailure;

  constructor(reason: ResolverStartFailure, message: string, options: { details?: readonly string[]; cause?: unknown } = {}) {
    super(ErrorCode.ResolverStart, message, options);
    this.name = 'ResolverStartError';
    this.reason = reason;
  }
}
