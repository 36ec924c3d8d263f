import type { ChildProcess } from 'node:child_process';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { HostSide, InetSide } from '../../harness/index.js';
import { printed } from '../wait.js';

/** One IP packet as tcpdump printed it. */
export interface Packet {
  readonly family: 4 | 6;
  readonly src: string;
  readonly dst: string;
  readonly dport?: number;
  readonly text: string;
}

export interface Capture {
  /** The raw pcap so far (an nflog capture: for nflogPrefixes). */
  pcap(): Buffer;
  /** Ends the capture and returns what it saw: the IP packets, and the raw pcap. */
  stop(): Promise<{ packets: Packet[]; pcap: Buffer }>;
}

/** "a.b.c.d.port" / "a:b::c.port" → address and port. */
function endpoint(text: string, family: 4 | 6): { address: string; port?: number } {
  if (family === 4) {
    const parts = text.split('.');
    return parts.length === 5 ? { address: parts.slice(0, 4).join('.'), port: Number(parts[4]) } : { address: text };
  }
  const at = text.lastIndexOf('.');
  return at > 0 ? { address: text.slice(0, at), port: Number(text.slice(at + 1)) } : { address: text };
}

/**
 * tcpdump on an interface of one side (the internet's eth0: what arrived
 * from the host; nflog:N on the host: what egressd logged), from now until
 * stop(). `filter` is a pcap filter expression.
 */
export async function startCapture(side: HostSide | InetSide, iface: string, filter: readonly string[] = []): Promise<Capture> {
  const dir = mkdtempSync(join(tmpdir(), 'egd-capture-'));
  const file = join(dir, 'capture.pcap');
  // --immediate-mode: without it libpcap hands packets over in blocks, and those still in the
  // kernel's ring at SIGINT are lost — a leak could go unseen.
  const child: ChildProcess = side.spawn('tcpdump', ['-i', iface, '-nn', '--immediate-mode', '-U', '-w', file, ...filter]);
  try {
    await printed(child, 'stderr', `listening on ${iface}`, 10_000);
  } catch (error) {
    child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
    throw error;
  }
  return {
    pcap: () => (existsSync(file) ? readFileSync(file) : Buffer.alloc(0)),
    async stop() {
      if (child.exitCode === null) {
        await new Promise((resolve) => setTimeout(resolve, 300));
        const gone = new Promise((resolve) => child.once('exit', resolve));
        child.kill('SIGINT');
        await gone;
      }
      try {
        const pcap = existsSync(file) ? readFileSync(file) : Buffer.alloc(0);
        const read = spawnSync('tcpdump', ['-nn', '-t', '-r', file], { encoding: 'utf8' });
        const packets = read.stdout
          .split('\n')
          .map((line): Packet | undefined => {
            const match = /^(IP6?) (\S+) > (\S+?):/.exec(line);
            if (!match) return undefined;
            const family = match[1] === 'IP6' ? 6 : 4;
            const src = endpoint(match[2] ?? '', family);
            const dst = endpoint(match[3] ?? '', family);
            return { family, src: src.address, dst: dst.address, ...(dst.port !== undefined && { dport: dst.port }), text: line };
          })
          .filter((packet): packet is Packet => packet !== undefined);
        return { packets, pcap };
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    },
  };
}
