import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHmac } from 'node:crypto';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { getTorInfo, readTorStatus } from '../../src/tor/control.js';
import { updatesLine } from '../../src/tor/status.js';
import { createTestNet, ensureTestUsers, harnessUnavailableReason, type TestNet } from '../harness/index.js';
import { startTorNetwork, torUnavailableReason, type TorNetwork } from '../support/tor/network.js';

/**
 * readTorStatus against the real thing — the host's tor of a private Tor
 * network, over its control socket and its TCP control port — and against
 * peers that are not Tor or not this Tor: every failure is an answer a person
 * understands, bounded in time, never a throw, and the cookie never leaves.
 */
const READ_STATUS = join(import.meta.dirname, '..', 'support', 'tor', 'read-status.ts');
const unavailable = harnessUnavailableReason() ?? torUnavailableReason();

describe.skipIf(unavailable)(`the control-port client against a real Tor ${unavailable ? `(skipped: ${unavailable})` : ''}`, () => {
  let net: TestNet;
  let tor: TorNetwork;
  let scratch: string;

  beforeAll(async () => {
    net = await createTestNet();
    tor = await startTorNetwork(net, { names: { 'mirror.egressd.test': '203.0.113.80' } });
    scratch = mkdtempSync(join(tmpdir(), 'egd-control-'));
  }, 120_000);

  afterAll(async () => {
    await tor?.stop();
    await net?.destroy();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  const overTcp = async (cookieFile: string, user?: string) => {
    const result = await net.host.node(READ_STATUS, [JSON.stringify({ host: '127.0.0.1', port: tor.client.control.port, cookieFile })], user ? { user } : {});
    if (result.code !== 0) throw new Error(`read-status: ${result.stderr}`);
    return JSON.parse(result.stdout) as unknown;
  };

  it('reads bootstrap, circuit and version over the control socket and over TCP', async () => {
    const status = await readTorStatus({ socket: tor.client.control.socket, cookieFile: tor.client.control.cookieFile });
    expect(status).toEqual({ reachable: true, bootstrap: 100, summary: 'Done', circuitEstablished: true, version: expect.stringMatching(/^0\.4\.\d+\.\d+/) });
    expect(updatesLine(true, status)).toBe('updates: over Tor (bootstrapped 100 %)');
    expect(await overTcp(tor.client.control.cookieFile)).toEqual(status);
    console.info(
      `private Tor network: consensus in ${tor.times.consensusMs} ms, client bootstrapped in ${tor.times.client.bootstrapMs} ms, ready to exit in ${tor.times.client.exitReadyMs} ms, ${Math.round(tor.rssKiB() / 1024)} MiB RSS (4 tors)`,
    );
  });

  it('GETINFO of other keys, data blocks included', async () => {
    const answer = await getTorInfo({ socket: tor.client.control.socket, cookieFile: tor.client.control.cookieFile }, [
      'net/listeners/socks',
      'circuit-status',
    ]);
    expect(answer.ok).toBe(true);
    if (!answer.ok) return;
    expect(answer.values.get('net/listeners/socks')).toBe(`"127.0.0.1:${tor.client.socks.port}"`);
    expect(answer.values.get('circuit-status')).toMatch(/^\d+ BUILT /m);
  });

  it('a cookie another user cannot read, and a cookie of another Tor, are said so', async () => {
    const { app1 } = ensureTestUsers();
    expect(await overTcp(tor.client.control.cookieFile, app1.name)).toEqual({
      reachable: false,
      reason: `cookie unreadable (EACCES: ${tor.client.control.cookieFile})`,
    });
    const wrong = join(scratch, 'other-cookie');
    const cookie = readFileSync(tor.client.control.cookieFile);
    writeFileSync(wrong, Buffer.from(cookie.map((byte) => byte ^ 0xff)));
    expect(await readTorStatus({ socket: tor.client.control.socket, cookieFile: wrong })).toEqual({
      reachable: false,
      reason: expect.stringMatching(/^authentication refused: the control port does not know the cookie/),
    });
    const short = join(scratch, 'short-cookie');
    writeFileSync(short, cookie.subarray(0, 5));
    expect(await readTorStatus({ socket: tor.client.control.socket, cookieFile: short })).toEqual({
      reachable: false,
      reason: `cookie unreadable (${short} holds 5 bytes, not 32)`,
    });
    expect(await readTorStatus({ socket: tor.client.control.socket, cookieFile: join(scratch, 'none') })).toMatchObject({
      reason: expect.stringMatching(/^cookie unreadable \(ENOENT/),
    });
    // The right cookie still works after all that: the control port did not lock us out.
    copyFileSync(tor.client.control.cookieFile, join(scratch, 'copy'));
    expect(await readTorStatus({ socket: tor.client.control.socket, cookieFile: join(scratch, 'copy') })).toMatchObject({ reachable: true });
  });

  it('Tor stopped: "not running", over the socket and over TCP, and back once it runs', async () => {
    await tor.stopClient();
    try {
      const status = await readTorStatus({ socket: tor.client.control.socket, cookieFile: tor.client.control.cookieFile });
      expect(status).toEqual({ reachable: false, reason: `not running (nothing listens on ${tor.client.control.socket})` });
      expect(updatesLine(true, status)).toBe(`updates: blocked — Tor not running (nothing listens on ${tor.client.control.socket})`);
      expect(await overTcp(tor.client.control.cookieFile)).toEqual({
        reachable: false,
        reason: `not running (nothing listens on 127.0.0.1:${tor.client.control.port})`,
      });
    } finally {
      await tor.startClient();
    }
    expect(await readTorStatus({ socket: tor.client.control.socket, cookieFile: tor.client.control.cookieFile })).toMatchObject({
      reachable: true,
      bootstrap: 100,
    });
  });

  it('Tor crashed: its control socket left behind answers nothing, which is "not running" too', async () => {
    await tor.stopClient({ crash: true });
    try {
      expect(existsSync(tor.client.control.socket), 'the socket file outlived the crash').toBe(true);
      expect(await readTorStatus({ socket: tor.client.control.socket, cookieFile: tor.client.control.cookieFile })).toEqual({
        reachable: false,
        reason: `not running (nothing listens on ${tor.client.control.socket})`,
      });
    } finally {
      await tor.startClient();
    }
  });
});

/** A control port that is not (this) Tor: `answer` sees each line a client sends. */
async function fakePort(dir: string, answer: (line: string, socket: Socket) => void, onConnect?: (socket: Socket) => void) {
  const path = join(dir, `fake-${Math.random().toString(16).slice(2)}`);
  const received: string[] = [];
  const server: Server = createServer((socket) => {
    socket.on('error', () => {});
    onConnect?.(socket);
    let buffered = '';
    socket.on('data', (chunk) => {
      buffered += chunk.toString('latin1');
      for (let at = buffered.indexOf('\n'); at >= 0; at = buffered.indexOf('\n')) {
        const line = buffered.slice(0, at).replace(/\r$/, '');
        buffered = buffered.slice(at + 1);
        received.push(line);
        answer(line, socket);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return { path, received, close: () => new Promise<void>((resolve) => server.close(() => resolve())) };
}

describe('the control-port client against peers that are not Tor', () => {
  let dir: string;
  let cookieFile: string;
  const cookie = Buffer.alloc(32, 7);
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'egd-fake-control-'));
    cookieFile = join(dir, 'cookie');
    writeFileSync(cookieFile, cookie);
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const protocolInfo = (methods: string) =>
    `250-PROTOCOLINFO 1\r\n250-AUTH METHODS=${methods} COOKIEFILE="${cookieFile}"\r\n250-VERSION Tor="0.4.9.11"\r\n250 OK\r\n`;
  /** A fake that knows the cookie: SAFECOOKIE done right, then `afterAuth` for what follows. */
  const knowsCookie = (afterAuth: (line: string, socket: Socket) => void, authReply = '250 OK\r\n') => {
    const serverNonce = Buffer.alloc(32, 9);
    return (line: string, socket: Socket) => {
      if (line.startsWith('PROTOCOLINFO')) socket.write(protocolInfo('COOKIE,SAFECOOKIE'));
      else if (line.startsWith('AUTHCHALLENGE SAFECOOKIE ')) {
        const clientNonce = Buffer.from(line.split(' ')[2] ?? '', 'hex');
        const hash = createHmac('sha256', 'Tor safe cookie authentication server-to-controller hash')
          .update(Buffer.concat([cookie, clientNonce, serverNonce]))
          .digest('hex');
        socket.write(`250 AUTHCHALLENGE SERVERHASH=${hash.toUpperCase()} SERVERNONCE=${serverNonce.toString('hex').toUpperCase()}\r\n`);
      } else if (line.startsWith('AUTHENTICATE')) socket.write(authReply);
      else afterAuth(line, socket);
    };
  };

  it('nothing listening: "not running", on a socket path and on a TCP port', async () => {
    expect(await readTorStatus({ socket: join(dir, 'absent'), cookieFile })).toEqual({
      reachable: false,
      reason: `not running (nothing listens on ${join(dir, 'absent')})`,
    });
    const port = await new Promise<number>((resolve) => {
      const probe = createServer().listen(0, '127.0.0.1', () => {
        const { port: free } = probe.address() as { port: number };
        probe.close(() => resolve(free));
      });
    });
    expect(await readTorStatus({ host: '127.0.0.1', port, cookieFile })).toEqual({
      reachable: false,
      reason: `not running (nothing listens on 127.0.0.1:${port})`,
    });
  });

  it('a peer that speaks something else, closes at once, floods, or says nothing: told apart, within the time given', async () => {
    const http = await fakePort(dir, (_line, socket) => socket.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
    expect(await readTorStatus({ socket: http.path, cookieFile })).toEqual({
      reachable: false,
      reason: "control port answered something that is not Tor's control protocol",
    });
    const closes = await fakePort(
      dir,
      () => {},
      (socket) => socket.destroy(),
    );
    expect(await readTorStatus({ socket: closes.path, cookieFile })).toEqual({ reachable: false, reason: 'control port closed the connection' });
    const flood = await fakePort(dir, (_line, socket) => {
      const chunk = `250-${'a'.repeat(1000)}\r\n`.repeat(100);
      const pump = () => {
        while (!socket.destroyed && socket.write(chunk));
        if (!socket.destroyed) socket.once('drain', pump);
      };
      pump();
    });
    const flooded = Date.now();
    expect(await readTorStatus({ socket: flood.path, cookieFile }, { timeoutMs: 5000 })).toEqual({
      reachable: false,
      reason: "control port answered something that is not Tor's control protocol",
    });
    expect(Date.now() - flooded).toBeLessThan(2000);
    const silent = await fakePort(dir, () => {});
    const started = Date.now();
    expect(await readTorStatus({ socket: silent.path, cookieFile }, { timeoutMs: 300 })).toEqual({
      reachable: false,
      reason: `control port ${silent.path} did not answer within 300 ms`,
    });
    expect(Date.now() - started).toBeLessThan(1000);
    for (const fake of [http, closes, flood, silent]) await fake.close();
  });

  it('never hands the cookie to a port that does not prove it knows it', async () => {
    // Offers only plain COOKIE (which would send the cookie itself): refused before the cookie is read.
    const plain = await fakePort(dir, (line, socket) => line.startsWith('PROTOCOLINFO') && socket.write(protocolInfo('COOKIE')));
    expect(await readTorStatus({ socket: plain.path, cookieFile })).toEqual({
      reachable: false,
      reason: 'control port offers no cookie authentication (it offers COOKIE); egressd needs CookieAuthentication 1',
    });
    // Offers SAFECOOKIE but answers with a hash made without the cookie.
    const guesser = await fakePort(dir, (line, socket) => {
      if (line.startsWith('PROTOCOLINFO')) socket.write(protocolInfo('SAFECOOKIE'));
      else if (line.startsWith('AUTHCHALLENGE')) socket.write(`250 AUTHCHALLENGE SERVERHASH=${'AB'.repeat(32)} SERVERNONCE=${'CD'.repeat(32)}\r\n`);
    });
    expect(await readTorStatus({ socket: guesser.path, cookieFile })).toMatchObject({
      reachable: false,
      reason: expect.stringMatching(/^authentication refused: the control port does not know the cookie/),
    });
    for (const fake of [plain, guesser]) {
      expect(fake.received.some((line) => line.startsWith('AUTHENTICATE'))).toBe(false);
      expect(fake.received.join('\n').toLowerCase()).not.toContain(cookie.toString('hex'));
      await fake.close();
    }
  });

  it('a refused AUTHENTICATE, a refused GETINFO and a nonsense bootstrap value are said so', async () => {
    const refuses = await fakePort(
      dir,
      knowsCookie(() => {}, '515 Authentication failed: Safe cookie response did not match expected value.\r\n'),
    );
    expect(await readTorStatus({ socket: refuses.path, cookieFile })).toEqual({
      reachable: false,
      reason: 'authentication refused (515 Authentication failed: Safe cookie response did not match expected value.)',
    });
    const noInfo = await fakePort(
      dir,
      knowsCookie((line, socket) => line.startsWith('GETINFO') && socket.write('552 Unrecognized key "status/bootstrap-phase"\r\n')),
    );
    expect(await readTorStatus({ socket: noInfo.path, cookieFile })).toEqual({
      reachable: false,
      reason: 'control port refused GETINFO (552 Unrecognized key "status/bootstrap-phase")',
    });
    const nonsense = await fakePort(
      dir,
      knowsCookie(
        (line, socket) =>
          line.startsWith('GETINFO') &&
          socket.write('250-status/bootstrap-phase=NOTICE BOOTSTRAP PROGRESS=250 TAG=x SUMMARY="x"\r\n250-status/circuit-established=1\r\n250 OK\r\n'),
      ),
    );
    expect(await readTorStatus({ socket: nonsense.path, cookieFile })).toEqual({
      reachable: false,
      reason: "control port answered something that is not Tor's control protocol",
    });
    // And the same fake, answering sensibly, is read (escapes and control bytes in SUMMARY made printable).
    const fine = await fakePort(
      dir,
      knowsCookie(
        (line, socket) =>
          line.startsWith('GETINFO') &&
          socket.write(
            '250-status/bootstrap-phase=NOTICE BOOTSTRAP PROGRESS=45 TAG=requesting_descriptors SUMMARY="Asking for \\"relay\\" descriptors\x1b"\r\n250-status/circuit-established=0\r\n250-version=0.4.9.11\r\n250 OK\r\n',
          ),
      ),
    );
    const status = await readTorStatus({ socket: fine.path, cookieFile });
    expect(status).toEqual({ reachable: true, bootstrap: 45, summary: 'Asking for "relay" descriptors?', circuitEstablished: false, version: '0.4.9.11' });
    expect(updatesLine(true, status)).toBe('updates: blocked — Tor bootstrapping (45 %: Asking for "relay" descriptors?)');
    for (const fake of [refuses, noInfo, nonsense, fine]) await fake.close();
  });
});
