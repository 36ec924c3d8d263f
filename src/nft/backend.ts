/**
 * The seam between the typed client (./client.ts) and the two ways of
 * talking to nftables: libnftables in-process (./libnftables.ts) and the
 * `nft` binary (./binary.ts). Both take the same request and report the same
 * outcome; neither interprets nft's answer — the client does, in one place.
 */

export type NftBackendKind = 'libnftables' | 'binary';

export interface NftRequest {
  /** One transaction: nft text, or a libnftables JSON document. */
  readonly input: string;
  /** `json` input also asks for JSON output; `text` input gets text output. */
  readonly format: 'text' | 'json';
  /** Dry run (`nft -c`): nft parses, evaluates and checks, the kernel keeps nothing. */
  readonly check: boolean;
  /** Leave set elements out of listings (`nft -t`). */
  readonly terse: boolean;
  /**
   * A long call (a listing with every element, a whole generation): the
   * in-process backend runs it off the event loop. Text input always is.
   */
  readonly long?: boolean;
}

export interface NftOutcome {
  /** nft's own verdict: the whole transaction applied (or checked) cleanly. */
  readonly ok: boolean;
  /** What nft printed as output (listings; empty for most changes). */
  readonly output: string;
  /** What nft printed as errors or warnings, verbatim. */
  readonly error: string;
}

export interface NftBackend {
  readonly kind: NftBackendKind;
  /**
   * Runs one transaction. Resolves with nft's outcome whether or not nft
   * accepted it; rejects only when nft could not be asked at all.
   */
  exec(request: NftRequest): Promise<NftOutcome>;
}
