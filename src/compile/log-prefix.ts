import { SHORT_ID, SHORT_ID_PATTERN } from './rule-ids.js';

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

const PREFIX = new RegExp(String.raw`^${LOG_PREFIX}(${SHORT_ID_PATTERN}) ?\0*$`);

/** The short id in a log prefix as the kernel hands it over (its NUL and trailing space optional), or undefined if it is not egressd's. */
export function parseLogPrefix(prefix: string): string | undefined {
  const match = PREFIX.exec(prefix);
  return match?.[1];
}
