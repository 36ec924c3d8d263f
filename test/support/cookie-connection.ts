import type { TestNet } from '../harness/index.js';

/**
 * A TCP connection a peer in the internet namespace opens to a listener on
 * the host side with a SYN cookie: the peer first holds two connections it
 * never completes (a table of the test's own there drops what comes back to
 * their ports), which fill a backlog of 1 on this kernel (6.18: a queue is
 * full past the backlog; kernels that count it full at the backlog answer
 * the second with a cookie already), so its next SYN is answered with a
 * cookie. The listener writes what it is given to each connection it
 * accepts and closes it at once, leaving what the kernel has not yet sent
 * to a closed socket.
 */
const HELD_PORTS = [40001, 40002];

const LISTENER = String.raw`
import socket, sys
addr, size, once = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'once'
s = socket.socket(socket.AF_INET6 if ':' in addr else socket.AF_INET, socket.SOCK_STREAM)
s.bind((addr, 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b'x' * size)
    except OSError:
        pass
    c.close()
    if once:
        print('closed', flush=True)
        break
`;

/** Prints whether its last connection connected, and how many bytes came over it within `seconds`. */
const PEER = String.raw`
import json, socket, sys, time
addr, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[5])
HELD_PORTS = [int(p) for p in sys.argv[4].split(',')]
family = socket.AF_INET6 if ':' in addr else socket.AF_INET
held = []
for i in range(count):
    h = socket.socket(family, socket.SOCK_STREAM)
    h.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    h.bind(('', HELD_PORTS[i]))
    h.setblocking(False)
    h.connect_ex((addr, port))
    held.append(h)
time.sleep(0.3)
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(3)
try:
    s.connect((addr, port))
except OSError as e:
    print(json.dumps({'connected': False, 'bytes': 0, 'error': str(e)}), flush=True)
    sys.exit(0)
got = 0
deadline = time.time() + seconds
while time.time() < deadline:
    s.settimeout(max(0.1, deadline - time.time()))
    try:
        d = s.recv(65536)
    except socket.timeout:
        break
    except OSError:
        break
    if not d:
        break
    got += len(d)
print(json.dumps({'connected': True, 'bytes': got}), flush=True)
`;

/** The internet side's table that keeps the held connections half-open; once per test net. */
export async function holdHalfOpen(net: TestNet): Promise<void> {
  await net.inet.nft({
    stdin: `table inet syncookies {\n  chain input {\n    type filter hook input priority 0;\n    tcp dport { ${HELD_PORTS.join(', ')} } drop\n  }\n}\n`,
  });
}

/** TcpExt SyncookiesSent of the host side. */
export async function cookiesSent(net: TestNet): Promise<number> {
  const netstat = await net.host.run('cat', ['/proc/net/netstat']);
  const [names, values] = netstat.split('\n').filter((line) => line.startsWith('TcpExt:'));
  const at = names!.split(/\s+/).indexOf('SyncookiesSent');
  if (at < 0) throw new Error('no TcpExt SyncookiesSent in /proc/net/netstat');
  return Number(values!.split(/\s+/)[at]);
}

export interface CookieAttempt {
  readonly connected: boolean;
  /** What reached the peer over its last connection. */
  readonly bytes: number;
  /** SYN cookies the host side sent meanwhile. */
  readonly cookies: number;
}

export interface AttemptOptions {
  /** Half-open connections the peer holds first: 2 to be answered with a cookie, 0 for a plain handshake. */
  readonly held: number;
  readonly family?: 'v4' | 'v6';
  /** How long the peer reads; default 4 s. */
  readonly seconds?: number;
  /** Told once the listener closed its first accepted connection (and then exited): what the test does while the peer still reads. */
  readonly onClosed?: () => Promise<void>;
}

/** A listener run as `who` (its user, group, cgroup), one bytes-writing connection to it from the peer: what reached the peer. */
export async function cookieAttempt(net: TestNet, who: { user: string; group?: string; cgroup?: string }, options: AttemptOptions): Promise<CookieAttempt> {
  const address = net.addrs.host[options.family ?? 'v4'];
  const once = options.onClosed !== undefined;
  const listener = net.host.spawn('/usr/bin/python3', ['-c', LISTENER, address, '1900', once ? 'once' : 'loop'], who);
  try {
    const lines: string[] = [];
    const waiters: (() => void)[] = [];
    listener.stdout!.on('data', (d: Buffer) => {
      lines.push(...d.toString().split('\n').filter(Boolean));
      for (const wake of waiters.splice(0)) wake();
    });
    const line = (index: number, what: string): Promise<string> =>
      new Promise((resolve, reject) => {
        const check = () => {
          if (lines.length > index) resolve(lines[index]!);
          else waiters.push(check);
        };
        listener.once('exit', (code) => reject(new Error(`the listener exited (${code}) before ${what}`)));
        check();
      });
    const port = Number(await line(0, 'it listened'));
    const before = await cookiesSent(net);
    const peer = net.inet.run('/usr/bin/python3', [
      '-c',
      PEER,
      address,
      String(port),
      String(options.held),
      HELD_PORTS.join(','),
      String(options.seconds ?? 4),
    ]);
    if (options.onClosed) {
      await line(1, 'it closed the connection');
      await new Promise((resolve) => listener.once('exit', resolve));
      await options.onClosed();
    }
    return { ...(JSON.parse(await peer) as { connected: boolean; bytes: number }), cookies: (await cookiesSent(net)) - before };
  } finally {
    listener.kill('SIGKILL');
  }
}
