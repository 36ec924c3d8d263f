/**
 * A sample app for `egressctl try`: looks a name up through the resolver it
 * is given, then opens a TCP connection to the address it learned (or, like
 * software with an address built in, to a fallback address), and prints
 * what happened as one JSON line. Run as a script:
 * `sample-app.js NAME PORT RESOLVER [FALLBACK-ADDRESS]`.
 */
import { Resolver } from 'node:dns/promises';
import * as net from 'node:net';

/** What the app prints; try.ts reads it (the same shape, declared there). */
interface SampleOutcome {
  /** The addresses the lookup returned, or its DNS error (ENOTFOUND is NXDOMAIN, EREFUSED is REFUSED). */
  readonly lookup: { readonly addresses: readonly string[] } | { readonly error: string };
  /** Where it tried to connect; undefined when it had nowhere to go. */
  readonly address: string | undefined;
  /** "connected", or the connection's error: ETIMEDOUT when a packet was dropped. */
  readonly connect: string | undefined;
}

const CONNECT_TIMEOUT_MS = 1500;

async function lookup(name: string, server: string): Promise<SampleOutcome['lookup']> {
  const resolver = new Resolver({ timeout: 2000, tries: 1 });
  resolver.setServers([server]);
  try {
    return { addresses: await resolver.resolve4(name) };
  } catch (error) {
    return { error: (error as NodeJS.ErrnoException).code ?? String(error) };
  }
}

function connect(address: string, port: number): Promise<string> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: address, port, timeout: CONNECT_TIMEOUT_MS });
    socket.once('connect', () => {
      socket.end('hi\n');
      resolve('connected');
    });
    socket.once('timeout', () => {
      socket.destroy();
      resolve('ETIMEDOUT');
    });
    socket.once('error', (error: NodeJS.ErrnoException) => resolve(error.code ?? error.message));
  });
}

async function main(argv: readonly string[]): Promise<void> {
  const [name, portText, server, fallback] = argv;
  if (!name || !portText || !server) throw new Error('usage: sample-app NAME PORT RESOLVER [FALLBACK-ADDRESS]');
  const looked = await lookup(name, server);
  const address = 'addresses' in looked ? looked.addresses[0] : fallback;
  const outcome: SampleOutcome = { lookup: looked, address, connect: address === undefined ? undefined : await connect(address, Number(portText)) };
  process.stdout.write(`${JSON.stringify(outcome)}\n`);
}

await main(process.argv.slice(2));
