// A UDP flood for the denial tests and bench: argv: addresses (comma-separated), first port, ports, milliseconds, max packets.
// Sends round-robin over every address × port (distinct destinations) as fast as the socket takes them; prints {"sent": N}.
'use strict';
const dgram = require('node:dgram');
const net = require('node:net');
const [addressList, firstPort, portCount, ms, max] = process.argv.slice(2);
const addresses = addressList.split(',');
const v4 = dgram.createSocket('udp4');
const v6 = dgram.createSocket('udp6');
const payload = Buffer.from('x');
const until = Date.now() + Number(ms);
const limit = Number(max);
let sent = 0;
let inFlight = 0;
function pump() {
  while (inFlight < 256 && sent < limit) {
    if ((sent & 1023) === 0 && Date.now() >= until) break;
    const address = addresses[sent % addresses.length];
    const port = Number(firstPort) + (Math.floor(sent / addresses.length) % Number(portCount));
    const socket = net.isIPv6(address) ? v6 : v4;
    inFlight++;
    sent++;
    socket.send(payload, port, address, () => {
      inFlight--;
      if (inFlight === 0) setImmediate(pump);
    });
  }
  if (inFlight === 0 && (sent >= limit || Date.now() >= until)) {
    process.stdout.write(`${JSON.stringify({ sent })}\n`);
    v4.close();
    v6.close();
  }
}
pump();
