import type { Ident, TestNet } from '../harness/index.js';
import { printed, until } from './wait.js';

/**
 * A TCP connection that its client closes first, as most clients do once
 * answered. The client's last ACK then leaves from TIME_WAIT — a socket
 * without an owner (`meta skuid` loads nothing) — and the server, in
 * LAST_ACK, leaves it only when that ACK arrives. Dropped, the server stays
 * there resending its FIN for minutes: so its socket leaving LAST_ACK is
 * what the remote side saw of the close.
 */

/** Internet side: answers one connection's first bytes with "ok", waits for the client's FIN, closes, and says "closed". */
const SERVER = String.raw`
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1)
print('ready', flush=True)
c, _ = s.accept()
c.recv(16); c.sendall(b'ok\n')
while c.recv(16): pass
c.close()
print('closed', flush=True)
sys.stdin.read()
`;

/** Host side: connects (with SO_MARK argv[3] unless 0), sends, reads the answer and closes first; prints whether "ok" came back. */
const CLIENT = String.raw`
import json, socket, sys
addr, port, mark = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET)
if mark:
    s.setsockopt(socket.SOL_SOCKET, 36, mark)
s.settimeout(2)
s.connect((addr, port)); s.sendall(b'hi\n')
answer = s.recv(16)
s.close()
print(json.dumps({'ok': answer.startswith(b'ok')}))
`;

/** Debian's, for every user: root's PATH may find another that other users cannot run. */
const PYTHON = '/usr/bin/python3';

/** The TCP sockets on one side in `state` that `filter` (ss's filter) selects. */
async function socketsIn(side: TestNet['host'] | TestNet['inet'], state: string, filter: string): Promise<number> {
  const out = await side.run('ss', ['-Htn', 'state', state, `( ${filter} )`]);
  return out.split('\n').filter((line) => line.trim() !== '').length;
}

/** Server sockets on `port` in LAST_ACK on the internet side: each waits for an ACK that did not arrive (or has not yet). */
export function lastAcks(net: TestNet, port: number): Promise<number> {
  return socketsIn(net.inet, 'last-ack', `sport = :${port}`);
}

/** The host side's sockets in TIME_WAIT towards `addr` port `port`: each closed first, and cleanly (a reset leaves none). */
export function timeWaits(net: TestNet, addr: string, port: number): Promise<number> {
  return socketsIn(net.host, 'time-wait', `dst ${addr.includes(':') ? `[${addr}]` : addr} and dport = :${port}`);
}

/**
 * Runs one such connection from the host side as `user` (root if absent)
 * with `mark`, and resolves once the server has closed and its socket has
 * left LAST_ACK; rejects if it is still there after `timeoutMs` (its FIN is
 * resent after 0.2, 0.6, 1.4 … s, each answered by an ACK the table saw).
 */
export async function closeFirst(net: TestNet, o: { addr: string; port: number; user?: Ident; mark?: number; timeoutMs?: number }): Promise<void> {
  const server = net.inet.spawn(PYTHON, ['-c', SERVER, o.addr, String(o.port)]);
  try {
    await printed(server, 'stdout', 'ready');
    const waitingBefore = await timeWaits(net, o.addr, o.port);
    const closed = printed(server, 'stdout', 'closed');
    // Should the client fail, the server is killed before it closes: that is not a second failure.
    closed.catch(() => {});
    const client = await net.host.exec(PYTHON, ['-c', CLIENT, o.addr, String(o.port), String(o.mark ?? 0)], o.user === undefined ? {} : { user: o.user });
    if (client.code !== 0 || !(JSON.parse(client.stdout) as { ok: boolean }).ok) throw new Error(`client: ${client.stdout}${client.stderr}`);
    await closed;
    // The client closed first, cleanly: what follows is its last ACK from TIME_WAIT (not a reset, which would end LAST_ACK too).
    if ((await timeWaits(net, o.addr, o.port)) <= waitingBefore) throw new Error(`the client's socket to ${o.addr}:${o.port} is not in TIME_WAIT`);
    await until(
      `the server on port ${o.port} to leave LAST_ACK (the client's last ACK, sent from TIME_WAIT, to arrive)`,
      async () => (await lastAcks(net, o.port)) === 0,
      {
        timeoutMs: o.timeoutMs ?? 3000,
      },
    );
  } finally {
    server.kill();
  }
}
