import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { promisify } from 'node:util';
import dgram from 'node:dgram';
import net from 'node:net';
import dnsPacket, { type Answer, type DecodedPacket, type Packet } from 'dns-packet';
import { until } from '../support/wait.js';
import { dnsmasqOnly } from '../support/dnsmasq.js';

const execFileAsync = promisify(execFile);

/** A port free for UDP and TCP on 127.0.0.1 just now. */
export async function freePort(): Promise<number> {
  for (;;) {
    const udp = dgram.createSocket('udp4');
    const port = await new Promise<number>((resolve) => udp.bind(0, '127.0.0.1', () => resolve(udp.address().port)));
    const tcp = net.createServer();
    const free = await new Promise<boolean>((resolve) => {
      tcp.once('error', () => resolve(false));
      tcp.listen(port, '127.0.0.1', () => resolve(true));
    });
    udp.close();
    await new Promise<void>((resolve) => (free ? tcp.close(() => resolve()) : resolve()));
    if (free) return port;
  }
}

export interface Dnsmasq {
  readonly port: number;
  /** Queries dnsmasq logged so far (one line per query it received). */
  queries(): string[];
  stop(): Promise<void>;
}

/**
 * Debian's dnsmasq on 127.0.0.1:`port` as the upstream under test, answering
 * from its command line only (no resolv.conf, no hosts, no config file), in
 * the foreground; its query log goes to stderr and is collected.
 */
export async function startDnsmasq(args: readonly string[]): Promise<Dnsmasq> {
  const port = await freePort();
  const child: ChildProcess = spawn('/usr/sbin/dnsmasq', [...dnsmasqOnly('127.0.0.1', port), '--log-queries', '--log-facility=-', ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  child.stderr!.on('data', (chunk: Buffer) => (log += chunk.toString()));
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  await until(`dnsmasq on port ${port} answering (its log: ${log})`, async () => {
    if (child.exitCode !== null) throw new Error(`dnsmasq exited: ${log}`);
    try {
      await udpQuery(port, { type: 'query', id: 1, flags: dnsPacket.RECURSION_DESIRED, questions: [{ type: 'A', name: 'probe.invalid' }] }, 300);
      return true;
    } catch {
      return false;
    }
  });
  return {
    port,
    queries: () => log.split('\n').filter((line) => /: (query|auth)\[/.test(line) && !line.includes('probe.invalid')),
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

/** One query over UDP to 127.0.0.1:`port`; rejects after `timeoutMs`. */
export function udpQuery(port: number, packet: Packet | Buffer, timeoutMs = 5000): Promise<DecodedPacket & { raw: Buffer }> {
  return new Promise((resolve, reject) => {
    const socket = dgram.createSocket('udp4');
    const timer = setTimeout(() => {
      socket.close();
      reject(new Error(`no UDP answer from port ${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.on('message', (raw) => {
      clearTimeout(timer);
      socket.close();
      try {
        resolve({ ...dnsPacket.decode(raw), raw });
      } catch (error) {
        reject(error instanceof Error ? error : new Error(String(error)));
      }
    });
    socket.send(Buffer.isBuffer(packet) ? packet : dnsPacket.encode(packet), port, '127.0.0.1');
  });
}

/** Sends `frames` (already length-prefixed or not) over one TCP connection at once; resolves with the replies as they came, once `expected` arrived or the connection closed. */
export function tcpExchange(port: number, messages: readonly Buffer[], expected: number, timeoutMs = 5000): Promise<Buffer[]> {
  return new Promise((resolve, reject) => {
    const socket = net.connect(port, '127.0.0.1');
    const replies: Buffer[] = [];
    let buffered = Buffer.alloc(0);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`${replies.length} of ${expected} TCP replies from port ${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    const done = (): void => {
      clearTimeout(timer);
      socket.destroy();
      resolve(replies);
    };
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) {
        replies.push(buffered.subarray(2, 2 + buffered.readUInt16BE(0)));
        buffered = buffered.subarray(2 + buffered.readUInt16BE(0));
      }
      if (replies.length >= expected) done();
    });
    socket.on('close', done);
    socket.on('error', () => undefined);
    socket.on('connect', () => socket.write(Buffer.concat(messages.map(frame))));
  });
}

export function frame(message: Buffer): Buffer {
  const out = Buffer.alloc(2 + message.length);
  out.writeUInt16BE(message.length, 0);
  message.copy(out, 2);
  return out;
}

/** dig against 127.0.0.1:`port`: its stdout. Asynchronous: the resolver under test answers from this same process. */
export async function dig(port: number, args: readonly string[], server = '127.0.0.1'): Promise<string> {
  try {
    const { stdout } = await execFileAsync('/usr/bin/dig', [`@${server}`, '-p', String(port), '+tries=1', '+time=5', ...args], {
      encoding: 'utf8',
      timeout: 15_000,
    });
    return stdout;
  } catch (error) {
    const e = error as { code?: number; stdout?: string; stderr?: string };
    throw new Error(`dig ${args.join(' ')} failed (${e.code}): ${e.stderr}${e.stdout}`, { cause: error });
  }
}

/** The answer lines of dig +noall +answer output as [name, ttl, type, data]. */
export function answerLines(output: string): [string, number, string, string][] {
  return output
    .split('\n')
    .filter((line) => line.trim() !== '' && !line.startsWith(';'))
    .map((line) => {
      const [name, ttl, , type, ...data] = line.split(/\s+/);
      return [name!, Number(ttl), type!, data.join(' ')];
    });
}

/** The status word (NOERROR, NXDOMAIN, …) of dig output with +comments. */
export function digStatus(output: string): string | undefined {
  return /status: ([A-Z]+)/.exec(output)?.[1];
}

export const query = (name: string, type: 'A' | 'AAAA' | 'TXT' | 'MX' | 'CNAME' = 'A', id = 4242, edns = false): Buffer =>
  dnsPacket.encode({
    type: 'query',
    id,
    flags: dnsPacket.RECURSION_DESIRED,
    questions: [{ type, name }],
    ...(edns
      ? { additionals: [{ type: 'OPT' as const, name: '.', udpPayloadSize: 4096, extendedRcode: 0, ednsVersion: 0, flags: 0, flag_do: false, options: [] }] }
      : {}),
  });

export const rcodeOf = (packet: DecodedPacket): number => (packet.flags ?? 0) & 0xf;

/** A record's data, for the record types that have one (not OPT). */
export const dataOf = (record: Answer): unknown => ('data' in record ? record.data : undefined);
