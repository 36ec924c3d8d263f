#!/usr/bin/env node
// Writes policies/lists/doh-names.txt and doh-addresses.txt, the public
// DNS-over-HTTPS endpoints 15-dns-bypass.yaml denies, from a clone of
// https://github.com/dibdot/DoH-IP-blocklists (GPL-3.0, Dirk Brenken):
//
//   git clone https://github.com/dibdot/DoH-IP-blocklists /tmp/doh
//   node scripts/doh-lists.js /tmp/doh/.git [COMMIT]
//
// Names: doh-domains.txt (the endpoints that answered when the list was
// last checked), as they are. Addresses: doh-ipv4.txt and doh-ipv6.txt,
// less two kinds, each kept in the file as a comment that says why:
// - addresses that are not on the public internet (private, shared,
//   loopback, link-local, documentation, unspecified): a deny there would
//   cut off this machine's own network;
// - addresses of shared fronts, which serve unrelated sites on the same
//   addresses, so that a deny by address would cut those off: Cloudflare's
//   proxy ranges (https://www.cloudflare.com/ips-v4, /ips-v6) unless only
//   Cloudflare's own resolver names answer them, CloudFront's IPv6 range
//   (2600:9000::/28, https://ip-ranges.amazonaws.com/ip-ranges.json), and
//   Apple's CDN edges (names under v.aaplimg.com). Such endpoints are still
//   denied by name (their answers never reach a client).
// Best effort: an endpoint on another provider's shared front (a CloudFront
// IPv4 address, say) stays in the list; spare it here if one turns up.
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { BlockList, isIPv4 } from 'node:net';
import { join } from 'node:path';
import process from 'node:process';

const [gitDir, commitArg] = process.argv.slice(2);
if (!gitDir) {
  process.stderr.write('usage: node scripts/doh-lists.js GIT_DIR_OF_DoH-IP-blocklists [COMMIT]\n');
  process.exit(2);
}
const git = (...args) => execFileSync('git', ['--git-dir', gitDir, ...args], { encoding: 'utf8', maxBuffer: 64 << 20 });
const commit = git('rev-parse', `${commitArg ?? 'HEAD'}^{commit}`).trim();
const date = git('show', '-s', '--format=%cI', commit).trim();
const show = (file) => git('show', `${commit}:${file}`);

const SOURCE = 'https://github.com/dibdot/DoH-IP-blocklists';
const header = (what) =>
  [
    `# ${what}`,
    `# Source: ${SOURCE} (Dirk Brenken), commit ${commit} (${date})`,
    '# Licence: GPL-3.0, see LICENSE.doh-ip-blocklists beside this file',
    '# Made by scripts/doh-lists.js, which says what was left out and why; do not edit by hand.',
    '',
  ].join('\n');

// Not the public internet (IANA special-purpose registries).
const local = new BlockList();
for (const [net, bits] of [
  ['0.0.0.0', 8],
  ['10.0.0.0', 8],
  ['100.64.0.0', 10],
  ['127.0.0.0', 8],
  ['169.254.0.0', 16],
  ['172.16.0.0', 12],
  ['192.0.0.0', 24],
  ['192.0.2.0', 24],
  ['192.168.0.0', 16],
  ['198.18.0.0', 15],
  ['198.51.100.0', 24],
  ['203.0.113.0', 24],
  ['224.0.0.0', 3],
])
  local.addSubnet(net, bits, 'ipv4');
for (const [net, bits] of [
  ['::', 127],
  ['64:ff9b:1::', 48],
  ['100::', 64],
  ['2001:db8::', 32],
  ['fc00::', 7],
  ['fe80::', 10],
  ['ff00::', 8],
])
  local.addSubnet(net, bits, 'ipv6');

// https://www.cloudflare.com/ips-v4 and https://www.cloudflare.com/ips-v6, and CloudFront's IPv6 range.
const shared = new BlockList();
for (const net of [
  '173.245.48.0/20',
  '103.21.244.0/22',
  '103.22.200.0/22',
  '103.31.4.0/22',
  '141.101.64.0/18',
  '108.162.192.0/18',
  '190.93.240.0/20',
  '188.114.96.0/20',
  '197.234.240.0/22',
  '198.41.128.0/17',
  '162.158.0.0/15',
  '104.16.0.0/13',
  '104.24.0.0/14',
  '172.64.0.0/13',
  '131.0.72.0/22',
  '2400:cb00::/32',
  '2606:4700::/32',
  '2803:f800::/32',
  '2405:b500::/32',
  '2405:8100::/32',
  '2a06:98c0::/29',
  '2c0f:f248::/32',
  // CloudFront's IPv6 range.
  '2600:9000::/28',
]) {
  const [address, bits] = net.split('/');
  shared.addSubnet(address, Number(bits), isIPv4(address) ? 'ipv4' : 'ipv6');
}
/** Cloudflare's own resolver: its addresses serve it alone. */
const cloudflareResolver = (name) => name === 'cloudflare-dns.com' || name.endsWith('.cloudflare-dns.com') || name === 'one.one.one.one';

const kept = [];
const spared = [];
for (const file of ['doh-ipv4.txt', 'doh-ipv6.txt']) {
  for (const line of show(file).split('\n')) {
    const [address = '', comment = ''] = line.split('#').map((part) => part.trim());
    if (address === '') continue;
    const family = isIPv4(address) ? 'ipv4' : 'ipv6';
    const names = comment.split(/,\s*/).filter(Boolean);
    const entry = `${address.padEnd(40)}# ${names.join(', ')}`;
    if (local.check(address, family)) spared.push(`#   ${entry} — not a public address`);
    else if (shared.check(address, family) && !names.every(cloudflareResolver)) spared.push(`#   ${entry} — a shared CDN front`);
    else if (names.some((name) => name.endsWith('.v.aaplimg.com'))) spared.push(`#   ${entry} — Apple's CDN edge`);
    else kept.push(entry);
  }
}

const names = show('doh-domains.txt')
  .split('\n')
  .map((line) => line.trim())
  .filter((line) => line !== '' && !line.startsWith('#'));

const dir = join(import.meta.dirname, '..', 'policies', 'lists');
writeFileSync(join(dir, 'doh-names.txt'), `${header(`Public DNS-over-HTTPS endpoints, by name (${names.length}): doh-domains.txt`)}${names.join('\n')}\n`);
writeFileSync(
  join(dir, 'doh-addresses.txt'),
  `${header(`Public DNS-over-HTTPS endpoints, by address (${kept.length}): doh-ipv4.txt and doh-ipv6.txt`)}` +
    `# Left out (${spared.length}): addresses not on the public internet, and addresses of shared\n` +
    '# CDN fronts that serve other sites too (the names behind them are denied by name):\n' +
    `${spared.join('\n')}\n\n${kept.join('\n')}\n`,
);
writeFileSync(join(dir, 'LICENSE.doh-ip-blocklists'), show('LICENSE'));
process.stderr.write(`doh-lists: ${names.length} names, ${kept.length} addresses, ${spared.length} left out, from ${commit}\n`);
