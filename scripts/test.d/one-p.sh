#!/usr/bin/env bash
# The durable queue with one P (a one-core router, or GOMAXPROCS=1): its
# commit fsync then goes through Linux native AIO, waited for on the poller
# (bridges/queue/aio_linux.go), a path `go test ./...` on a multi-core
# machine does not take. The queue's own tests and the power-cut test
# (bastiond killed with SIGKILL under load and restarted: every
# acknowledged message must reach the cloud) run here once more with
# GOMAXPROCS=1, which bastiond inherits: the whole path, end to end, with
# the asynchronous fsync. (A SIGKILL leaves the page cache alone, so this
# checks that nothing is acknowledged before its commit returns, not the
# disk; the fsync itself is the kernel's vfs_fsync either way.)
set -euo pipefail
cd "$(dirname "$0")/../.."
GOMAXPROCS=1 go test -count=1 ./bridges/queue/
GOMAXPROCS=1 go test -count=1 -run '^TestPowerCut$' ./integration/powercut/
