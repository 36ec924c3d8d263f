#!/usr/bin/env bash
# Installs everything egressd needs on Debian 12, idempotently: Debian packages
# first (only those missing), then the npm packages pinned by package-lock.json,
# then the TypeScript build. Run as root from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(nftables libnftables1 iproute2 util-linux procps iputils-ping passwd tcpdump)
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
