// The test's apt mirror: serves a directory over HTTP and prints one JSON line
// per request (the peer's address is what the tests check: the exit's, never the host's).
//   node mirror-server.cjs ROOT ADDRESS PORT
'use strict';
const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const [root, address, port] = process.argv.slice(2);
const say = (o) => process.stdout.write(`${JSON.stringify(o)}\n`);

const server = http.createServer((req, res) => {
  const url = new URL(req.url ?? '/', 'http://mirror');
  const file = path.join(root, path.normalize(decodeURIComponent(url.pathname)));
  const peer = (req.socket.remoteAddress ?? '').replace(/^::ffff:/, '');
  let status = 404;
  let bytes = 0;
  if (file.startsWith(root) && fs.existsSync(file) && fs.statSync(file).isFile()) {
    status = 200;
    bytes = fs.statSync(file).size;
    res.writeHead(200, { 'content-length': bytes, 'last-modified': fs.statSync(file).mtime.toUTCString() });
    if (req.method === 'HEAD') res.end();
    else fs.createReadStream(file).pipe(res);
  } else {
    res.writeHead(404, { 'content-length': 0 });
    res.end();
  }
  res.on('finish', () => say({ ev: 'access', peer, method: req.method, path: url.pathname, status, bytes, time: Date.now() }));
});
server.listen(Number(port), address, () => say({ ev: 'listening' }));
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
