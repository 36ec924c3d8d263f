#!/usr/bin/env bash
# Runs egressd on the shipped default policies (./policies), as root on
# Debian 12, in the foreground, installing what it needs first.
#
# egressd applies the policy as table inet egressd (replaced atomically; no
# other table is touched), re-applies it on SIGHUP, and on Ctrl-C stops
# leaving the rules in force. "node dist/cli/main.js release" removes them.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
node dist/cli/main.js check policies
exec node dist/daemon/main.js --policy policies
