#!/bin/sh
# egressd-early.service's ExecStart: puts a ruleset of egressd in force with nft
# alone, before any interface is up. systemd/README.md says why each case is so.
#   egressd-early.sh STATE_DIR FAILSAFE_RULESET
# Exit 0 when a table is in force (already, or loaded here); 1 when only the
# fail-safe one could be loaded in place of the last good one; 2 when none.
set -u
state=$1 failsafe=$2

# Never over a table in force: nft -f of a ruleset adds its chains beside the live
# generation's (measured: a second output base chain), so a re-run loads nothing.
if nft list tables inet | grep -qx 'table inet egressd'; then
  echo "table inet egressd is already in force; nothing loaded"
  exit 0
fi

# The boot form (src/enforce/boot-form.ts) is last-good without its cgroup
# elements: nft refuses a whole file naming a cgroup that does not exist yet,
# and at boot most do not. A state directory from before the boot form has
# only last-good.nft, which loads where it names no cgroup.
tried=''
for f in "$state/last-good-boot.nft" "$state/last-good.nft"; do
  [ -e "$f" ] || continue
  if nft -f "$f"; then
    echo "last good ruleset in force ($f)"
    exit 0
  fi
  echo "nft refused $f" >&2
  tried="$tried $f"
done

# No last good ruleset: egressd never applied here (or its state is gone).
if nft -f "$failsafe"; then
  if [ -n "$tried" ]; then
    echo "the last good ruleset could not be loaded ($tried ); the shipped default's fail-safe form is in force ($failsafe) until egressd applies" >&2
    exit 1
  fi
  echo "no last good ruleset yet; the shipped default's fail-safe form is in force ($failsafe) until egressd applies"
  exit 0
fi
echo "no ruleset could be loaded: egress is not enforced until egressd applies" >&2
exit 2
