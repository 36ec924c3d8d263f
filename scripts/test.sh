#!/usr/bin/env bash
# Runs every test, as root, on a Debian 12 machine: installs what the tests
# need first (scripts/setup.sh), then vitest. Kernel tests build their own
# network namespaces and never touch this machine's ruleset or network.
# Ends with one line: "N passed, N failed[, N skipped]".
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 3

report=$(mktemp /tmp/egressd-vitest-XXXXXX.json)
trap 'rm -f "$report"' EXIT
npx --no-install vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@"
status=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = r.numPendingTests + r.numTodoTests;
  console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$report" 2>/dev/null || echo "0 passed, 1 failed"
exit $status
