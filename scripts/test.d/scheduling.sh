#!/usr/bin/env bash
# Tests about which goroutine the Go scheduler runs next: the race detector
# randomizes that order, so these build only without -race (//go:build
# !race) and run here, not in scripts/test's `go test -race ./...`.
set -euo pipefail
cd "$(dirname "$0")/../.."
go test -count=5 -run '^TestCommitTakesReadiedWriters$' ./bridges/queue/
