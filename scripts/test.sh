#!/usr/bin/env bash
# Runs every test, as root, on a Debian 12 machine: installs what the tests
# need first (scripts/setup.sh), then vitest. Kernel tests build their own
# network namespaces and never touch this machine's ruleset or network.
# Lints the tree (eslint, prettier) before the tests.
# Ends with one line: "N passed, N failed[, N skipped]".
set -uo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh || exit 3

# Lint and format check first; the tests run either way, so one run shows both.
echo "lint: eslint (type-aware) and prettier --check" >&2
npm run --silent lint
lint_status=$?

report=$(mktemp /tmp/egressd-vitest-XXXXXX.json)
trap 'rm -f "$report"' EXIT
npx --no-install vitest run --reporter=default --reporter=json --outputFile.json="$report" "$@"
status=$?
if ((lint_status != 0)); then
  echo "lint failed (above): 'npm run format' fixes formatting; eslint's messages name the rest. It counts as one failure." >&2
fi
# The last line: vitest's counts, with a failed lint counted as one more failure.
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  // A file whose beforeAll failed reports its tests as skipped and none failed: it counts as one failure.
  const brokenFiles = r.testResults.filter((f) => f.status === "failed" && !f.assertionResults.some((a) => a.status === "failed")).length;
  const failed = r.numFailedTests + brokenFiles + (process.argv[2] === "0" ? 0 : 1);
  const skipped = r.numPendingTests + r.numTodoTests;
  console.log(`${r.numPassedTests} passed, ${failed} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$report" "$lint_status" 2>/dev/null || echo "0 passed, 1 failed"
((status != 0)) && exit $status
exit $lint_status
