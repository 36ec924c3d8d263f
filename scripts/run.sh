#!/usr/bin/env bash
# Runs egressd on the shipped default policies (./policies), as root on
# Debian 12, installing what it needs first.
#
# The daemon is not built yet: for now this validates the shipped policies
# and prints the nftables table they compile to, without applying it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
node dist/cli/main.js check policies
node dist/cli/main.js compile policies
