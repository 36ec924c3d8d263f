import { SHORT_ID } from './rule-ids.js';

/**
 * The NFLOG prefix of a denying rule: "egd " and the rule's short id
 * (rule-ids.ts), 14 bytes — well inside the kernel's 127, whatever the
 * policy's file names. The denial reader parses it back with parseLogPrefix.
 */
export const LOG_PREFIX = 'egd ';

export function logPrefix(shortId: string): string {
  if (!SHORT_ID.test(shortId)) throw new Error(`internal: ${JSON.stringify(shortId)} is not a short rule id`);
  return `${LOG_PREFIX}${shortId} `;
}

/** The short id in a log prefix as the kernel hands it over (its NUL and trailing space optional), or undefined if it is not egressd's. */
export function parseLogPrefix(prefix: string): string | undefined {
  const match = /^egd (r[0-9a-f]{8}) ?\0*$/.exec(prefix);
  return match?.[1];
}
