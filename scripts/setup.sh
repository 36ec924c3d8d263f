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
# python3, make, g++: better-sqlite3 (the denial store) builds from source; its prebuilt download is unreachable here.
# tor: the tests' private Tor network (updates over Tor); installed without being started (see below).
# debootstrap, systemd-container: a minimal Debian booted under a real systemd, for the units' tests.
debian_packages=(nftables libnftables1 libnftnl11 libmnl0 netbase iproute2 util-linux procps iputils-ping passwd tcpdump libnss-extrausers systemd dbus python3-dbus python3-gi dnsmasq-base bind9-dnsutils python3 make g++ tor debootstrap systemd-container)
if [[ ${1:-} == --bench ]]; then
  # bench/packet-cost.ts: a load generator in C, a compiler for its server, perf for its profile.
  # bench/resolver.ts: dnsperf drives the load; dnsmasq (above) is the resolver compared against.
  # bench/denials.ts: ulogd2 writing the same NFLOG group to SQLite is the reader compared against.
  debian_packages+=(wrk gcc libc6-dev linux-perf dnsperf ulogd2 ulogd2-sqlite3)
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
  # Packages such as tor and ulogd2 would start their services on install; the tests start their own
  # instances and the host must not begin talking to the Tor network because the tests were set up.
  # policy-rc.d refuses those starts for the length of the install (only if the host has none of its own).
  made_policy_rc=
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy_rc=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [[ -n $made_policy_rc ]]; then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  # Installed for the tests only: do not let the next boot start them either.
  if [[ -d /run/systemd/system ]]; then
    for unit in tor.service ulogd2.service; do
      if [[ " ${missing[*]} " == *" ${unit%.service} "* ]]; then systemctl disable --quiet "$unit" 2>/dev/null || true; fi
    done
  fi
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
