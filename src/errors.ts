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
