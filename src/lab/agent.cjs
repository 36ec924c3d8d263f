// Network agent of the test harness: a recording server, a one-shot client, a bounded
// sender loop and a long-lived session. The harness runs it inside a test namespace as
//   node -e <this file's text> <json config>
// (passing the text, not the path, so that any uid can run it). Plain CommonJS, no
// dependencies, so Node starts it fast. Output: one JSON object per line on stdout.
'use strict';
const net = require('node:net');
const dgram = require('node:dgram');
const readline = require('node:readline');

const cfg = JSON.parse(process.argv[process.argv.length - 1]);

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

/** '::ffff:192.0.2.1' → '192.0.2.1' (dual-stack sockets report v4 peers this way). */
function norm(addr) {
  if (typeof addr === 'string' && addr.startsWith('::ffff:') && addr.includes('.')) return addr.slice(7);
  return addr;
}

function errCode(e) {
  return (e && (e.code || e.message)) || String(e);
}

// ---------------------------------------------------------------- server
function server() {
  const readWaitMs = cfg.readWaitMs ?? 300;
  if (cfg.proto === 'tcp' && cfg.lines) {
    // Long-lived connections: every line received is recorded (with its text) and echoed.
    const srv = net.createServer((sock) => {
      const base = { proto: 'tcp', peer: norm(sock.remoteAddress), peerPort: sock.remotePort, local: norm(sock.localAddress), localPort: sock.localPort };
      sock.on('error', () => {});
      readline.createInterface({ input: sock }).on('line', (text) => {
        out({ ev: 'seen', ...base, time: Date.now(), bytes: Buffer.byteLength(text) + 1, text });
        sock.write(`echo ${text}\n`);
      });
    });
    srv.on('error', (e) => {
      out({ ev: 'error', error: errCode(e) });
      process.exit(2);
    });
    srv.listen({ host: cfg.addr, port: cfg.port, ipv6Only: false }, () => {
      out({ ev: 'listening', port: srv.address().port });
    });
  } else if (cfg.proto === 'tcp') {
    const srv = net.createServer((sock) => {
      const time = Date.now();
      const rec = {
        ev: 'seen',
        proto: 'tcp',
        peer: norm(sock.remoteAddress),
        peerPort: sock.remotePort,
        local: norm(sock.localAddress),
        localPort: sock.localPort,
        time,
        bytes: 0,
      };
      let done = false;
      const finish = () => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        out(rec); // printed before the reply, so a client that got "ok" is always recorded
        sock.end('ok\n');
      };
      const timer = setTimeout(finish, readWaitMs);
      sock.on('data', (d) => {
        rec.bytes += d.length;
        finish();
      });
      sock.on('end', finish);
      sock.on('error', () => finish());
    });
    srv.on('error', (e) => {
      out({ ev: 'error', error: errCode(e) });
      process.exit(2);
    });
    srv.listen({ host: cfg.addr, port: cfg.port, ipv6Only: false }, () => {
      out({ ev: 'listening', port: srv.address().port });
    });
  } else {
    const sock = dgram.createSocket({ type: net.isIPv6(cfg.addr) ? 'udp6' : 'udp4', ipv6Only: false });
    sock.on('error', (e) => {
      out({ ev: 'error', error: errCode(e) });
      process.exit(2);
    });
    sock.on('message', (msg, rinfo) => {
      out({
        ev: 'seen',
        proto: 'udp',
        peer: norm(rinfo.address),
        peerPort: rinfo.port,
        local: norm(sock.address().address),
        localPort: sock.address().port,
        time: Date.now(),
        bytes: msg.length,
      });
      sock.send('ok', rinfo.port, rinfo.address);
    });
    sock.bind({ address: cfg.addr, port: cfg.port }, () => out({ ev: 'listening', port: sock.address().port }));
  }
  // Control channel: "sync N" is answered after every record printed before it. The
  // server exits when its stdin closes, so it never outlives the harness that started it.
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    const m = /^sync (\d+)$/.exec(line.trim());
    if (m) out({ ev: 'sync', n: Number(m[1]) });
  });
  rl.on('close', () => process.exit(0));
}

// ---------------------------------------------------------------- client
/** One attempt; resolves { ok, connected, error?, reply? }, never rejects. */
function attempt(c) {
  const payload = c.payload ?? 'hi\n';
  const timeoutMs = c.timeoutMs ?? 2000;
  return new Promise((resolve) => {
    let settled = false;
    let reply = '';
    let connected = false;
    let cleanup = () => {};
    const settle = (r) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      cleanup();
      resolve(r);
    };
    const timer = setTimeout(() => settle({ ok: false, connected, error: 'ETIMEDOUT' }), timeoutMs);
    if (c.proto === 'tcp') {
      const opts = { host: c.addr, port: c.port };
      if (c.srcAddr) opts.localAddress = c.srcAddr;
      if (c.srcPort) opts.localPort = c.srcPort;
      const s = net.connect(opts);
      cleanup = () => s.destroy();
      s.on('connect', () => {
        connected = true;
        s.write(payload);
      });
      s.on('data', (d) => {
        reply += d.toString();
        if (reply.includes('\n')) settle({ ok: reply.startsWith('ok'), connected, reply: reply.trim() });
      });
      s.on('end', () =>
        settle(reply.startsWith('ok') ? { ok: true, connected, reply: reply.trim() } : { ok: false, connected, error: 'ECONNRESET', reply: reply.trim() }),
      );
      s.on('error', (e) => settle({ ok: false, connected, error: errCode(e) }));
    } else {
      const s = dgram.createSocket(net.isIPv6(c.addr) ? 'udp6' : 'udp4');
      cleanup = () => {
        try {
          s.close();
        } catch {
          /* already closed */
        }
      };
      s.on('error', (e) => settle({ ok: false, connected, error: errCode(e) }));
      s.on('message', (m) => settle({ ok: m.toString().startsWith('ok'), connected, reply: m.toString().trim() }));
      const go = () =>
        s.connect(c.port, c.addr, () => {
          connected = true;
          s.send(payload, (e) => {
            if (e) settle({ ok: false, connected, error: errCode(e) });
          });
        });
      if (c.srcAddr || c.srcPort) s.bind({ address: c.srcAddr, port: c.srcPort ?? 0 }, go);
      else go();
    }
  });
}

async function client() {
  const r = await attempt(cfg);
  out({ ev: 'result', ...r });
  process.exit(0);
}

// ---------------------------------------------------------------- session
/**
 * One TCP connection kept open: "send TEXT" on stdin writes TEXT and a newline;
 * every line that comes back is reported. Exits when stdin closes.
 */
function session() {
  const s = net.connect({ host: cfg.addr, port: cfg.port });
  let connected = false;
  const timer = setTimeout(() => {
    out({ ev: 'connected', ok: false, error: 'ETIMEDOUT' });
    process.exit(0);
  }, cfg.timeoutMs ?? 2000);
  s.on('connect', () => {
    connected = true;
    clearTimeout(timer);
    out({ ev: 'connected', ok: true, local: norm(s.localAddress), localPort: s.localPort });
  });
  s.on('error', (e) => {
    if (!connected) {
      clearTimeout(timer);
      out({ ev: 'connected', ok: false, error: errCode(e) });
      process.exit(0);
    }
    out({ ev: 'error', error: errCode(e) });
  });
  s.on('close', () => out({ ev: 'closed' }));
  readline.createInterface({ input: s }).on('line', (text) => out({ ev: 'line', text }));
  const rl = readline.createInterface({ input: process.stdin });
  rl.on('line', (line) => {
    if (line.startsWith('send ')) s.write(`${line.slice(5)}\n`);
  });
  rl.on('close', () => {
    s.destroy();
    process.exit(0);
  });
}

// ---------------------------------------------------------------- bounded sender loop
async function loop() {
  const start = Date.now();
  const count = cfg.count;
  const intervalMs = cfg.intervalMs ?? 50;
  const maxMs = cfg.maxMs;
  let stopping = false;
  process.on('SIGTERM', () => {
    stopping = true;
    out({ ev: 'done', reason: 'stopped' });
    process.exit(0);
  });
  for (let i = 0; i < count && !stopping; i++) {
    if (Date.now() - start >= maxMs) break;
    const left = maxMs - (Date.now() - start);
    const r = await attempt({ ...cfg, timeoutMs: Math.max(1, Math.min(cfg.attemptTimeoutMs ?? 1000, left)) });
    out({ ev: 'attempt', ok: r.ok, error: r.error });
    if (i + 1 < count && intervalMs > 0) await new Promise((res) => setTimeout(res, intervalMs));
  }
  out({ ev: 'done', reason: 'finished' });
  process.exit(0);
}

if (cfg.mode === 'server') server();
else if (cfg.mode === 'client') void client();
else if (cfg.mode === 'loop') void loop();
else if (cfg.mode === 'session') session();
else {
  out({ ev: 'error', error: 'unknown mode ' + cfg.mode });
  process.exit(2);
}
