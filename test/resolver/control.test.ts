import { lstatSync, mkdirSync, mkdtempSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { askResolver, startControlServer, type ControlServer } from '../../src/resolver/control.js';
import { AddressMemory } from '../../src/resolver/memory.js';

const dirs: string[] = [];
const servers: ControlServer[] = [];
afterEach(async () => {
  for (const server of servers.splice(0)) await server.close();
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

function socketPath(): string {
  const dir = mkdtempSync(join(tmpdir(), 'egd-control-'));
  dirs.push(dir);
  return join(dir, 'run', 'resolver.sock');
}

async function started(memory = new AddressMemory(), options: { maxRequestBytes?: number } = {}) {
  const path = socketPath();
  const server = await startControlServer({ path, memory, counters: () => ({ queries: 7 }), ...options });
  servers.push(server);
  return { path, memory, server };
}

/** Sends raw bytes and collects every reply line until the server closes or `lines` arrive. */
function raw(path: string, bytes: string | Buffer, lines: number): Promise<string[]> {
  return new Promise((resolve, reject) => {
    const socket = createConnection(path);
    let text = '';
    const done = () => {
      socket.destroy();
      resolve(text.split('\n').filter((l) => l !== ''));
    };
    socket.on('connect', () => socket.write(bytes));
    socket.on('data', (chunk) => {
      text += chunk.toString('utf8');
      if (text.split('\n').length > lines) done();
    });
    socket.on('close', done);
    socket.on('error', reject);
    setTimeout(() => reject(new Error(`no ${lines} lines within 5 s: ${JSON.stringify(text)}`)), 5_000);
  });
}

describe('resolver control socket', () => {
  it('round trip: names an address was learned from (any spelling of it), and the counters; the socket is 0600', async () => {
    const memory = new AddressMemory();
    memory.remember(['www.example.org', 'edge.cdn.example'], '2001:db8::7', 300);
    const { path } = await started(memory);
    expect(lstatSync(path).mode & 0o777).toBe(0o600);

    const names = await askResolver({ op: 'names', address: '2001:0DB8::0007' }, { path });
    expect(names.running).toBe(true);
    expect(names.running && names.reply).toMatchObject({
      ok: true,
      op: 'names',
      address: '2001:db8::7',
      names: [
        { name: 'edge.cdn.example', expiresAt: expect.any(Number) },
        { name: 'www.example.org', expiresAt: expect.any(Number) },
      ],
      chains: [['www.example.org', 'edge.cdn.example']],
    });
    const status = await askResolver({ op: 'status' }, { path });
    expect(status.running && status.reply).toEqual({
      ok: true,
      op: 'status',
      memory: { entries: 1, names: 2, evictions: 0, expired: 0 },
      shared: [],
      resolver: { queries: 7 },
    });
  });

  it('bad input gets an error line, and the server keeps answering', async () => {
    const { path } = await started(undefined, { maxRequestBytes: 256 });
    const replies = await raw(
      path,
      [
        'not json',
        '[1,2]',
        '{"op":"names"}',
        '{"op":"names","address":"example.org"}',
        '{"op":"status","extra":1}',
        `{"op":"status","pad":"${'x'.repeat(300)}"}`,
        '{"op":"status"}',
        '',
      ].join('\n'),
      7,
    );
    expect(replies.map((l) => JSON.parse(l) as { ok: boolean; error?: string })).toEqual([
      { ok: false, error: expect.stringMatching(/^not JSON/) },
      { ok: false, error: expect.stringMatching(/^not a request/) },
      { ok: false, error: expect.stringMatching(/^not a request/) },
      { ok: false, error: '"example.org" is not an IP address' },
      { ok: false, error: expect.stringMatching(/^not a request/) },
      { ok: false, error: 'request longer than 256 bytes' },
      expect.objectContaining({ ok: true, op: 'status' }),
    ]);
    // A line that never ends is cut off at the limit, with a reason, and the connection closed.
    expect(await raw(path, Buffer.alloc(10_000, 0x61), 2)).toEqual(['{"ok":false,"error":"request longer than 256 bytes"}']);
    expect((await askResolver({ op: 'status' }, { path })).running).toBe(true);
  });

  it('client: no socket, a stale one, one that never answers — "not running" with the reason, quickly', async () => {
    const path = socketPath();
    const absent = await askResolver({ op: 'status' }, { path });
    expect(absent).toEqual({ running: false, why: `not running: no control socket at ${path}` });

    // A resolver that died left its socket behind (node unlinks its own on close: this one was moved away first), and a new one takes it over.
    mkdirSync(join(path, '..'), { recursive: true });
    const ghost = createServer();
    await new Promise<void>((resolve) => ghost.listen(`${path}.ghost`, resolve));
    renameSync(`${path}.ghost`, path);
    await new Promise<void>((resolve) => ghost.close(() => resolve()));
    expect(lstatSync(path).isSocket()).toBe(true);
    expect(await askResolver({ op: 'status' }, { path })).toEqual({ running: false, why: `not running: nothing listens on ${path}` });
    const server = await startControlServer({ path, memory: new AddressMemory() });
    servers.push(server);
    expect((await askResolver({ op: 'status' }, { path })).running).toBe(true);
    // While one answers, a second refuses to take the socket.
    await expect(startControlServer({ path, memory: new AddressMemory() })).rejects.toThrow(/another resolver answers/);

    const silentPath = join(path, '..', 'silent.sock');
    const silent = createServer(() => undefined);
    await new Promise<void>((resolve) => silent.listen(silentPath, resolve));
    const started = Date.now();
    expect(await askResolver({ op: 'status' }, { path: silentPath, timeoutMs: 200 })).toEqual({
      running: false,
      why: `not answering: nothing came from ${silentPath} within 200 ms`,
    });
    expect(Date.now() - started).toBeLessThan(2_000);
    silent.close();
  });

  it('a client that asks and never reads is cut off, and the server keeps answering others', async () => {
    const memory = new AddressMemory();
    memory.remember(
      Array.from({ length: 32 }, (_, i) => `name-${i}.example`),
      '192.0.2.1',
      600,
    );
    const { path } = await started(memory);
    const closed = await new Promise<boolean>((resolve) => {
      const socket = createConnection(path);
      socket.on('connect', () => {
        socket.pause();
        const request = '{"op":"names","address":"192.0.2.1"}\n';
        // About 40 MB of replies asked for; none read.
        for (let i = 0; i < 20; i++) socket.write(request.repeat(1000));
      });
      socket.on('close', () => resolve(true));
      socket.on('error', () => undefined);
      setTimeout(() => resolve(false), 10_000);
    });
    expect(closed).toBe(true);
    expect((await askResolver({ op: 'status' }, { path })).running).toBe(true);
  });

  it('a file in the way that is no socket is left alone', async () => {
    const path = socketPath();
    mkdirSync(join(path, '..'), { recursive: true });
    writeFileSync(path, 'keep me');
    await expect(startControlServer({ path, memory: new AddressMemory() })).rejects.toThrow(/not a socket/);
  });
});
