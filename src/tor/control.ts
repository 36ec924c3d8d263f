/**
 * Asks Tor's control port how far it is: connect (TCP or unix socket),
 * PROTOCOLINFO, SAFECOOKIE authentication with the cookie file, GETINFO
 * status/bootstrap-phase, status/circuit-established and version, QUIT.
 * Bounded in time and size; never throws — every failure is a
 * `{ reachable: false, reason }` that reads after "Tor " in the status line.
 *
 * SAFECOOKIE only, never plain COOKIE: with COOKIE the cookie itself goes to
 * whoever listens on the port — when Tor is down, any local user can bind
 * 127.0.0.1:9051 and collect it. With SAFECOOKIE the cookie never leaves this
 * process, and the server proves it knows it too, so a fake port can neither
 * learn it nor feed us a status (tor offers SAFECOOKIE wherever it offers
 * COOKIE, since 0.2.3).
 */
import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import type { TorStatus } from './status.js';

export interface TorControlAddress {
  readonly socket?: string;
  readonly host?: string;
  readonly port?: number;
  readonly cookieFile: string;
}

const DEFAULT_TIMEOUT_MS = 3000;
/** A status conversation is a few hundred bytes; more is not Tor answering us. */
const MAX_REPLY_BYTES = 64 * 1024;
const COOKIE_BYTES = 32;
const SERVER_KEY = 'Tor safe cookie authentication server-to-controller hash';
const CLIENT_KEY = 'Tor safe cookie authentication controller-to-server hash';

/** One reply: its status code and its lines' text (after "NNN-", "NNN " or a "NNN+" data block). */
interface Reply {
  readonly code: string;
  readonly lines: readonly string[];
}

/** Why a conversation ended early, said to a person. */
class Unreachable extends Error {}

export async function readTorStatus(address: TorControlAddress, options: { timeoutMs?: number } = {}): Promise<TorStatus> {
  const answer = await getTorInfo(address, ['status/bootstrap-phase', 'status/circuit-established', 'version'], options);
  if (!answer.ok) return { reachable: false, reason: answer.reason };
  const phase = keyValues(answer.values.get('status/bootstrap-phase') ?? '');
  const progress = Number(phase.get('PROGRESS'));
  const circuit = answer.values.get('status/circuit-established');
  if (!Number.isInteger(progress) || progress < 0 || progress > 100 || (circuit !== '0' && circuit !== '1'))
    return { reachable: false, reason: garbage().message };
  const version = answer.values.get('version');
  return {
    reachable: true,
    bootstrap: progress,
    summary: printable(phase.get('SUMMARY') ?? ''),
    circuitEstablished: circuit === '1',
    ...(version !== undefined && { version: printable(version) }),
  };
}

/**
 * GETINFO of some keys after the same authentication (for what a status
 * line does not hold: circuit-status, net/listeners/socks). Values are as
 * Tor sent them (a data block's lines joined with "\n"); never throws.
 */
export async function getTorInfo(
  address: TorControlAddress,
  keys: readonly string[],
  options: { timeoutMs?: number } = {},
): Promise<{ readonly ok: true; readonly values: ReadonlyMap<string, string> } | { readonly ok: false; readonly reason: string }> {
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const where = address.socket ?? `${address.host ?? '127.0.0.1'}:${address.port ?? 9051}`;
  let conversation: Conversation | undefined;
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Unreachable(`control port ${where} did not answer within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    conversation = await Promise.race([Conversation.open(address, where), deadline]);
    const values = await Promise.race([ask(conversation, address.cookieFile, keys), deadline]);
    return { ok: true, values };
  } catch (error) {
    return { ok: false, reason: error instanceof Unreachable ? printable(error.message) : `control port ${where}: ${printable(String(error))}` };
  } finally {
    clearTimeout(timer);
    conversation?.close();
  }
}

async function ask(conversation: Conversation, cookieFile: string, keys: readonly string[]): Promise<Map<string, string>> {
  await authenticate(conversation, cookieFile);
  const reply = await conversation.command(`GETINFO ${keys.join(' ')}`);
  expectOk(reply, 'GETINFO');
  const values = new Map<string, string>();
  for (const line of reply.lines) {
    const at = line.indexOf('=');
    if (at > 0) values.set(line.slice(0, at), line.slice(at + 1).replace(/^\n/, ''));
  }
  conversation.send('QUIT');
  return values;
}

async function authenticate(conversation: Conversation, cookieFile: string): Promise<void> {
  const info = await conversation.command('PROTOCOLINFO 1');
  expectOk(info, 'PROTOCOLINFO');
  const methods = (/(?:^| )METHODS=([A-Z0-9,]+)/.exec(info.lines.find((line) => line.startsWith('AUTH ')) ?? '')?.[1] ?? '').split(',').filter(Boolean);
  if (!methods.includes('SAFECOOKIE'))
    throw new Unreachable(`control port offers no cookie authentication (it offers ${methods.join(', ') || 'nothing'}); egressd needs CookieAuthentication 1`);
  const cookie = await readCookie(cookieFile);
  const clientNonce = randomBytes(32);
  const challenge = await conversation.command(`AUTHCHALLENGE SAFECOOKIE ${clientNonce.toString('hex')}`);
  if (challenge.code !== '250') throw new Unreachable(`authentication refused (${challenge.code} ${challenge.lines.join(' ')})`);
  const fields = keyValues(challenge.lines[0] ?? '');
  const serverHash = hexField(fields.get('SERVERHASH'), 32);
  const serverNonce = hexField(fields.get('SERVERNONCE'), 32);
  if (!serverHash || !serverNonce) throw garbage();
  const message = Buffer.concat([cookie, clientNonce, serverNonce]);
  const expected = createHmac('sha256', SERVER_KEY).update(message).digest();
  if (!timingSafeEqual(expected, serverHash))
    throw new Unreachable(`authentication refused: the control port does not know the cookie in ${cookieFile} (another Tor, or not Tor, listens there)`);
  const auth = await conversation.command(`AUTHENTICATE ${createHmac('sha256', CLIENT_KEY).update(message).digest('hex')}`);
  if (auth.code !== '250') throw new Unreachable(`authentication refused (${auth.code} ${auth.lines.join(' ')})`);
}

async function readCookie(path: string): Promise<Buffer> {
  let cookie: Buffer;
  try {
    cookie = await readFile(path);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code ?? String(error);
    throw new Unreachable(`cookie unreadable (${code}: ${path})`);
  }
  if (cookie.length !== COOKIE_BYTES) throw new Unreachable(`cookie unreadable (${path} holds ${cookie.length} bytes, not ${COOKIE_BYTES})`);
  return cookie;
}

function expectOk(reply: Reply, what: string): void {
  if (reply.code === '250') return;
  if (reply.code === '514' || reply.code === '515') throw new Unreachable(`authentication refused (${reply.code} ${reply.lines.join(' ')})`);
  throw new Unreachable(`control port refused ${what} (${reply.code} ${reply.lines.join(' ')})`);
}

const garbage = () => new Unreachable("control port answered something that is not Tor's control protocol");

/** KEY=VALUE and KEY="quoted value" pairs of a reply line. */
function keyValues(text: string): Map<string, string> {
  const pairs = new Map<string, string>();
  for (const match of text.matchAll(/([A-Za-z0-9_]+)=(?:"((?:[^"\\]|\\.)*)"|(\S*))/g)) {
    pairs.set(match[1] ?? '', match[2] !== undefined ? match[2].replace(/\\(.)/g, '$1') : (match[3] ?? ''));
  }
  return pairs;
}

function hexField(value: string | undefined, bytes: number): Buffer | undefined {
  return value !== undefined && new RegExp(`^[0-9A-Fa-f]{${bytes * 2}}$`).test(value) ? Buffer.from(value, 'hex') : undefined;
}

/** What a peer said, safe to print on one line and short. */
function printable(text: string): string {
  const clean = text.replace(/[^\x20-\x7e]/g, '?');
  return clean.length > 200 ? `${clean.slice(0, 200)}…` : clean;
}

/** One control connection: commands sent one at a time, replies read line by line. */
class Conversation {
  private buffered = '';
  private received = 0;
  private readonly lines: string[] = [];
  private wake: (() => void) | undefined;
  private ended: Unreachable | undefined;

  private constructor(private readonly socket: Socket) {
    socket.setEncoding('latin1');
    socket.on('data', (chunk: string) => {
      this.received += chunk.length;
      if (this.received > MAX_REPLY_BYTES) {
        this.end(garbage());
        return;
      }
      this.buffered += chunk;
      for (let at = this.buffered.indexOf('\n'); at >= 0; at = this.buffered.indexOf('\n')) {
        this.lines.push(this.buffered.slice(0, at).replace(/\r$/, ''));
        this.buffered = this.buffered.slice(at + 1);
      }
      this.wake?.();
    });
    socket.on('error', (error: NodeJS.ErrnoException) =>
      this.end(
        new Unreachable(
          error.code === 'EPIPE' || error.code === 'ECONNRESET'
            ? 'control port closed the connection'
            : `control connection failed (${error.code ?? error.message})`,
        ),
      ),
    );
    socket.on('close', () => this.end(new Unreachable('control port closed the connection')));
  }

  static open(address: TorControlAddress, where: string): Promise<Conversation> {
    return new Promise((resolve, reject) => {
      const socket =
        address.socket !== undefined ? connect({ path: address.socket }) : connect({ host: address.host ?? '127.0.0.1', port: address.port ?? 9051 });
      const fail = (error: NodeJS.ErrnoException) => {
        socket.destroy();
        if (error.code === 'ECONNREFUSED' || error.code === 'ENOENT') reject(new Unreachable(`not running (nothing listens on ${where})`));
        else if (error.code === 'EACCES' || error.code === 'EPERM') reject(new Unreachable(`control port ${where} not accessible (${error.code})`));
        else reject(new Unreachable(`control port ${where} unreachable (${error.code ?? error.message})`));
      };
      socket.once('error', fail);
      socket.once('connect', () => {
        socket.off('error', fail);
        resolve(new Conversation(socket));
      });
    });
  }

  send(line: string): void {
    this.socket.write(`${line}\r\n`);
  }

  async command(line: string): Promise<Reply> {
    this.send(line);
    const texts: string[] = [];
    for (;;) {
      const next = await this.line();
      const match = /^([0-9]{3})([ +-])(.*)$/.exec(next);
      if (!match) throw garbage();
      const [, code = '', kind, text = ''] = match;
      if (kind === '+') {
        // A data block: lines up to a lone ".", a leading ".." standing for ".".
        const data: string[] = [text];
        for (let more = await this.line(); more !== '.'; more = await this.line()) data.push(more.startsWith('.') ? more.slice(1) : more);
        texts.push(data.join('\n'));
      } else texts.push(text);
      if (kind === ' ') return { code, lines: texts };
    }
  }

  private async line(): Promise<string> {
    for (;;) {
      const next = this.lines.shift();
      if (next !== undefined) return next;
      if (this.ended) throw this.ended;
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = undefined;
    }
  }

  private end(why: Unreachable): void {
    this.ended ??= why;
    this.socket.destroy();
    this.wake?.();
  }

  close(): void {
    this.socket.destroy();
  }
}
