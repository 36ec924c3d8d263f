/**
 * The small internet's DNS for `egressctl try`: an authoritative server for
 * a handful of names, on one address in the lab's internet namespace, so
 * that egressd's resolver in the lab has an upstream that is not this
 * machine's. Run as a script: `authority.js ADDRESS NAME=IPV4[,NAME=IPV4…]`;
 * it prints "ready" once it listens and stops with its namespace.
 */
import * as dgram from 'node:dgram';
import { isIPv4 } from 'node:net';
import * as dnsPacket from 'dns-packet';

function parseZone(text: string): Map<string, string> {
  const zone = new Map<string, string>();
  for (const entry of text.split(',')) {
    const [name, address] = entry.split('=');
    if (!name || !address || !isIPv4(address)) throw new Error(`authority: "${entry}" is not NAME=IPV4`);
    zone.set(name.toLowerCase(), address);
  }
  return zone;
}

/** The answer to one query: the zone's address for A, an empty NOERROR for other types of a known name, NXDOMAIN otherwise. */
function answer(query: Buffer, zone: ReadonlyMap<string, string>): Buffer | undefined {
  let packet: dnsPacket.Packet;
  try {
    packet = dnsPacket.decode(query);
  } catch {
    return undefined;
  }
  const question = packet.questions?.[0];
  if (!question) return undefined;
  const address = zone.get(question.name.toLowerCase());
  return dnsPacket.encode({
    type: 'response',
    id: packet.id ?? 0,
    flags: dnsPacket.AUTHORITATIVE_ANSWER | (address === undefined ? 3 : 0),
    questions: [question],
    answers: address !== undefined && question.type === 'A' ? [{ type: 'A', name: question.name, ttl: 300, data: address }] : [],
  });
}

function main(argv: readonly string[]): void {
  const [address, zoneText] = argv;
  if (!address || !zoneText) throw new Error('usage: authority ADDRESS NAME=IPV4[,NAME=IPV4…]');
  const zone = parseZone(zoneText);
  const socket = dgram.createSocket('udp4');
  socket.on('message', (query, peer) => {
    const reply = answer(query, zone);
    if (reply) socket.send(reply, peer.port, peer.address);
  });
  socket.bind(53, address, () => process.stdout.write('ready\n'));
}

main(process.argv.slice(2));
