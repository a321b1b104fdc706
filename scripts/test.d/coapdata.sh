#!/usr/bin/env bash
# pion-dtls's listener packages (internal/net, internal/net/udp) hold the
# Bastion patches' own tests for the listener I/O (rawudp_linux_test.go:
# recvmmsg batches, addresses, errors) and the packet buffer. third-party.sh
# runs them without -race, as it runs every patched package; they run here
# once more with -race: these tests are not timing-sensitive.
set -euo pipefail
cd "$(dirname "$0")/../../third_party"
go test -race -count=1 ./pion-dtls/internal/net/...
