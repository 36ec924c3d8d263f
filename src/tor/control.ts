import type { TorStatus } from './status.js';

/**
 * Stand-in until the tornet helper's control-port client is merged (the
 * lead keeps tornet's file): the contract of BRIEF-RT.md, answering as if
 * nothing listened.
 */
export interface TorControlAddress {
  readonly socket?: string;
  readonly host?: string;
  readonly port?: number;
  readonly cookieFile: string;
}

export function readTorStatus(_address: TorControlAddress, _options?: { timeoutMs?: number }): Promise<TorStatus> {
  return Promise.resolve({ reachable: false, reason: 'not running' });
}
