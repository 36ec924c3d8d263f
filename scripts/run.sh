#!/usr/bin/env bash
# Runs egressd on the shipped default policies (./policies), as root on
# Debian 12, installing what it needs first.
#
# The daemon is not built yet: for now this validates the shipped policies,
# enforces them (egressctl apply: table inet egressd, replaced atomically;
# no other table is touched) and shows the status. Enforcement stays in the
# kernel by itself; "node dist/cli/main.js release" removes it.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
node dist/cli/main.js check policies
node dist/cli/main.js apply policies
node dist/cli/main.js status policies
