import { openSockDiag, stateMask, TcpState } from '../system/sock-diag.js';
import type { Socks } from './files.js';

/**
 * The listening TCP socket that takes connections to `socks` in this
 * network namespace (a wildcard one too), by its owner: whether what holds
 * Tor's SOCKS port is Tor's user or something else. sock_diag, not a
 * connection: a connection would be answered by whatever listens, Tor or not.
 */
export function listenerAt(socks: Socks): { uid: number } | null {
  const diag = openSockDiag();
  try {
    const wild = socks.family === 4 ? ['0.0.0.0', '::'] : ['::'];
    const found = diag
      .tcpSockets(stateMask([TcpState.Listen]))
      .find(
        (s) => s.local.port === socks.port && (s.local.address === socks.host || s.local.address === `::ffff:${socks.host}` || wild.includes(s.local.address)),
      );
    return found ? { uid: found.uid } : null;
  } finally {
    diag.close();
  }
}

/**
 * Whether a listener's owner is Tor: Tor's user, or root — Debian's
 * tor.service starts Tor as root, and Tor opens its listeners before it
 * switches to its User, so its SOCKS socket stays root's (measured). The
 * table lets the same two answer from the SOCKS port (compile.ts,
 * tor/socks-answer).
 */
export function isTorsListener(listener: { readonly uid: number }, torUid: number | undefined): boolean {
  return listener.uid === 0 || listener.uid === torUid;
}
