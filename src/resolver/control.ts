import { chmodSync, lstatSync, mkdirSync, rmSync } from 'node:fs';
import { createConnection, createServer, isIP, type Server, type Socket } from 'node:net';
import { dirname } from 'node:path';
import { resolverNow } from './clock.js';
import { controlSocketPath } from './control-path.js';
import { EgressError, ErrorCode } from '../errors.js';
import { canonicalAddress, type AddressMemory, type LearnedName, type MemoryCounters } from './memory.js';

/**
 * The running resolver's local control socket: `egressctl explain --to
 * ADDRESS` and `egressctl status` ask it which names an address was learned
 * from, and for its counters. A unix stream socket, root's alone (0600 in
 * /run/egressd/net-<inode of the network namespace>.resolver.sock), one JSON object per line each way. A request longer than
 * `maxRequestBytes` or that is not a request gets an error line, never a
 * crash; the client gives up after a short timeout and says the resolver is
 * not running, so the CLI never hangs on it.
 */

export { controlSocketPath, controlSocketPathFor } from './control-path.js';
export const MAX_REQUEST_BYTES = 4096;
const SHARED_SHOWN = 10;
const MAX_UNREAD_REPLY_BYTES = 1 << 20;

export type ControlRequest = { readonly op: 'names'; readonly address: string } | { readonly op: 'status' };

/** Checked by hand, not with zod: the CLI loads this module for every explain and status, and zod's load is not free. */
function asRequest(json: unknown): ControlRequest | undefined {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) return undefined;
  const keys = Object.keys(json).sort().join(',');
  const { op, address } = json as { op?: unknown; address?: unknown };
  if (op === 'status' && keys === 'op') return { op };
  if (op === 'names' && keys === 'address,op' && typeof address === 'string' && address.length > 0 && address.length <= 64) return { op, address };
  return undefined;
}

export interface NamesReply {
  readonly ok: true;
  readonly op: 'names';
  readonly address: string;
  /** The resolver's clock when it answered (ms), to tell expiries by. */
  readonly now: number;
  readonly names: readonly LearnedName[];
  /** Each chain (question first) that leads to the address; more than one: it is shared. */
  readonly chains: readonly (readonly string[])[];
}
export interface StatusReply {
  readonly ok: true;
  readonly op: 'status';
  readonly memory: MemoryCounters;
  /** The addresses most recently learned that answer more than one chain of names (a CDN's), newest first, at most ten. */
  readonly shared: readonly { readonly address: string; readonly chains: readonly (readonly string[])[] }[];
  /** The resolver's own counters (queries, cache, refusals…), as its core keeps them. */
  readonly resolver: Readonly<Record<string, number>>;
}
export interface ErrorReply {
  readonly ok: false;
  readonly error: string;
}
export type ControlReply = NamesReply | StatusReply | ErrorReply;

export interface ControlServerOptions {
  readonly path?: string;
  readonly memory: AddressMemory;
  readonly counters?: () => Readonly<Record<string, number>>;
  readonly maxRequestBytes?: number;
  readonly maxConnections?: number;
  /** A connection that says nothing for this long is closed. */
  readonly idleMs?: number;
}

export interface ControlServer {
  readonly path: string;
  close(): Promise<void>;
}

/** Answers one request line; never throws. */
export function answer(line: string, options: Pick<ControlServerOptions, 'memory' | 'counters'>): ControlReply {
  let json: unknown;
  try {
    json = JSON.parse(line);
  } catch {
    return { ok: false, error: 'not JSON: one request object per line' };
  }
  const request = asRequest(json);
  if (!request) return { ok: false, error: 'not a request: {"op":"names","address":ADDRESS} or {"op":"status"}' };
  if (request.op === 'status')
    return { ok: true, op: 'status', memory: options.memory.counters(), shared: options.memory.shared(SHARED_SHOWN), resolver: options.counters?.() ?? {} };
  const bare = request.address.replace(/%.*$/, '');
  if (isIP(bare) === 0) return { ok: false, error: `"${request.address}" is not an IP address` };
  const address = canonicalAddress(request.address);
  // The memory's clock: `now` and the names' expiresAt compare with each other, not with the wall clock.
  const now = resolverNow();
  return { ok: true, op: 'names', address, now, names: options.memory.namesOf(address, now), chains: options.memory.sharedWith(address, now) };
}

export async function startControlServer(options: ControlServerOptions): Promise<ControlServer> {
  const path = options.path ?? controlSocketPath();
  const maxBytes = options.maxRequestBytes ?? MAX_REQUEST_BYTES;
  mkdirSync(dirname(path), { recursive: true, mode: 0o750 });
  await removeStaleSocket(path);
  const sockets = new Set<Socket>();
  const server = createServer((socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
    // A client that goes away mid-reply is its own business.
    socket.on('error', () => socket.destroy());
    socket.setTimeout(options.idleMs ?? 10_000, () => socket.destroy());
    let pending = Buffer.alloc(0);
    socket.on('data', (chunk: Buffer) => {
      pending = Buffer.concat([pending, chunk]);
      for (let newline = pending.indexOf(0x0a); newline >= 0; newline = pending.indexOf(0x0a)) {
        const line = pending.subarray(0, newline);
        pending = pending.subarray(newline + 1);
        const reply = line.length > maxBytes ? tooLong(maxBytes) : answer(line.toString('utf8'), options);
        socket.write(`${JSON.stringify(reply)}\n`);
        // A client that asks and never reads is cut off before its replies pile up.
        if (socket.writableLength > MAX_UNREAD_REPLY_BYTES) {
          socket.destroy();
          return;
        }
      }
      if (pending.length > maxBytes) {
        // No line end in sight: say why, and read no more of it.
        socket.end(`${JSON.stringify(tooLong(maxBytes))}\n`);
        socket.pause();
        pending = Buffer.alloc(0);
      }
    });
  });
  server.maxConnections = options.maxConnections ?? 16;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
  // Made with the umask's mode (never group- or world-writable, so no one else can connect meanwhile); root's alone from here.
  chmodSync(path, 0o600);
  server.on('error', () => undefined);
  return {
    path,
    close: () => closeServer(server, sockets, path),
  };
}

const tooLong = (maxBytes: number): ErrorReply => ({ ok: false, error: `request longer than ${maxBytes} bytes` });

async function closeServer(server: Server, sockets: Set<Socket>, path: string): Promise<void> {
  for (const socket of sockets) socket.destroy();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  rmSync(path, { force: true });
}

/** A socket left by a resolver that is gone is removed; one that answers belongs to a resolver still running. */
async function removeStaleSocket(path: string): Promise<void> {
  let stat;
  try {
    stat = lstatSync(path);
  } catch {
    return;
  }
  if (!stat.isSocket()) throw new EgressError(ErrorCode.Io, `${path} is there and is not a socket; egressd leaves it alone`);
  const answered = await askResolver({ op: 'status' }, { path, timeoutMs: 1_000 });
  if (answered.running) throw new EgressError(ErrorCode.Io, `another resolver answers on ${path}`);
  rmSync(path, { force: true });
}

export type AskOutcome = { readonly running: true; readonly reply: ControlReply } | { readonly running: false; readonly why: string };

/** Asks the running resolver; "not running" (and why, worded to follow "resolver ") instead of an error or a hang. */
export function askResolver(request: ControlRequest, options: { path?: string; timeoutMs?: number } = {}): Promise<AskOutcome> {
  const path = options.path ?? controlSocketPath();
  return new Promise((resolve) => {
    let settled = false;
    let received = Buffer.alloc(0);
    const socket = createConnection(path);
    const finish = (outcome: AskOutcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(outcome);
    };
    const timer = setTimeout(
      () => finish({ running: false, why: `not answering: nothing came from ${path} within ${options.timeoutMs ?? 500} ms` }),
      options.timeoutMs ?? 500,
    );
    socket.on('connect', () => socket.write(`${JSON.stringify(request)}\n`));
    socket.on('data', (chunk: Buffer) => {
      received = Buffer.concat([received, chunk]);
      const newline = received.indexOf(0x0a);
      if (newline < 0) {
        if (received.length > 1 << 20) finish({ running: false, why: `not egressd's: what answers on ${path} replied more than a line` });
        return;
      }
      try {
        finish({ running: true, reply: JSON.parse(received.subarray(0, newline).toString('utf8')) as ControlReply });
      } catch {
        finish({ running: false, why: `not egressd's: what answers on ${path} replied with no JSON` });
      }
    });
    socket.on('error', (error: NodeJS.ErrnoException) => {
      const why =
        error.code === 'ENOENT' || error.code === 'ECONNREFUSED'
          ? `not running: ${error.code === 'ENOENT' ? 'no control socket at' : 'nothing listens on'} ${path}`
          : error.code === 'EACCES'
            ? `not reachable: ${path} is root's alone`
            : `not reachable on ${path}: ${error.message}`;
      finish({ running: false, why });
    });
    socket.on('close', () => finish({ running: false, why: `not answering: ${path} was closed without a reply` }));
  });
}
