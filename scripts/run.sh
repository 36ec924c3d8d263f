#!/usr/bin/env bash
# Runs egressd on the shipped default policies (./policies), as root on
# Debian 12, in the foreground, installing what it needs first.
#
# egressd applies the policy as table inet egressd (replaced atomically; no
# other table is touched), re-applies it on SIGHUP, and answers DNS on
# 127.0.0.153 and ::1 so that rules written with names hold. The shipped
# policy lets only egressd's resolver send DNS off the machine, so this
# script points the machine at it first ("egressctl dns enable", which
# records what was there) and puts back exactly what was there when egressd
# stops ("egressctl dns disable"). On Ctrl-C egressd stops leaving the rules
# in force; "node dist/cli/main.js release" removes them.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
node dist/cli/main.js check policies
node dist/cli/main.js dns enable --policy policies
trap 'node dist/cli/main.js dns disable' EXIT
node dist/daemon/main.js --policy policies
