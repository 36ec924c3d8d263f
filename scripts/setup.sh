#!/usr/bin/env bash
# Installs everything egressd needs on Debian 12, idempotently: Debian packages
# first (only those missing), then the npm packages pinned by package-lock.json,
# then the TypeScript build. Run as root from the repository root.
#   scripts/setup.sh           what the service and the tests need
#   scripts/setup.sh --bench   and what the benchmarks need too (npm run bench)
set -euo pipefail
cd "$(dirname "$0")/.."

# netbase: /etc/protocols, where nft looks up protocol names such as ipv6-icmp.
# libnss-extrausers: an NSS module, for the test of users known only through NSS (test/system/nss.test.ts).
# systemd: busctl, through which check and status ask systemd for units' capabilities (not started here).
# dbus, python3-dbus, python3-gi: a private bus and a stand-in for systemd on it (test/system/capability-dbus.test.ts).
# libnftnl11, libmnl0: netfilter's own message builders, through which the resolver adds set elements without nft's cache.
# dnsmasq-base, bind9-dnsutils: a real authoritative DNS server in the tests' "internet", and dig to ask it.
debian_packages=(nftables libnftables1 libnftnl11 libmnl0 netbase iproute2 util-linux procps iputils-ping passwd tcpdump libnss-extrausers systemd dbus python3-dbus python3-gi dnsmasq-base bind9-dnsutils)
if [[ ${1:-} == --bench ]]; then
  # bench/packet-cost.ts: a load generator in C, a compiler for its server, perf for its profile.
  # bench/resolver.ts: dnsperf drives the load; dnsmasq (above) is the resolver compared against.
  debian_packages+=(wrk gcc libc6-dev linux-perf dnsperf)
elif [[ $# -gt 0 ]]; then
  echo "usage: scripts/setup.sh [--bench]" >&2
  exit 2
fi
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v node >/dev/null || ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)'; then
  echo "setup: Node.js 20 or newer is required" >&2
  exit 3
fi

# npm ci is exact but slow; skip it when the lock file has not changed since the last install.
stamp=node_modules/.egressd-lock
if [[ ! -f $stamp ]] || ! cmp -s package-lock.json "$stamp"; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
fi
npm run --silent build
