#!/usr/bin/env bash
# Bounds that hold only without the race detector (it enlarges every stack
# frame and makes sync.Pool drop items on purpose), so scripts/test's
# `go test -race ./...` skips or loosens them: bridges/mqtt's allocations per
# device message (TestAllocsPerMessage) and an idle session's goroutine
# stacks (TestIdleSessionMemory). They run here once without -race, and must
# have run and passed, not matched nothing or skipped. (bridges/queue's own
# TestAllocsPerMessage runs without -race in one-p.sh.)
set -euo pipefail
cd "$(dirname "$0")/../.."
tests="TestAllocsPerMessage TestIdleSessionMemory"
if ! out=$(go test -count=1 -v -run "^(${tests// /|})\$" ./bridges/mqtt/ 2>&1); then
	echo "$out"
	exit 1
fi
for t in $tests; do
	if ! grep -q "^--- PASS: $t " <<<"$out"; then
		echo "$out"
		echo "norace.sh: bridges/mqtt $t did not run and pass without -race" >&2
		exit 1
	fi
done
grep -E '^(--- |ok )' <<<"$out"
