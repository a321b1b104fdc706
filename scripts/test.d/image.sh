#!/usr/bin/env bash
# Appliance image suite: static router builds within budget, then the image
# built from Debian packages and booted in qemu (TCG) with its ports checked
# from the outside. Needs root (mmdebstrap, filesystem ownership); as root
# under scripts/test it never skips. Hard time limits on every step.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "-- images/cross.sh (static builds, size budget)"
t0=$(date +%s)
timeout 15m images/cross.sh
echo "-- cross builds took $(( $(date +%s) - t0 ))s"

echo "-- OpenWrt recipe: init script syntax, config adapter against the real bastiond"
sh -n images/openwrt/bastion/files/bastiond.init
owrt=$(mktemp -d)
trap 'rm -rf "$owrt"' EXIT
PATH="$PWD/images/out/cross/linux-amd64:$PATH" sh images/openwrt/bastion/files/openwrt-config "$owrt/bastion.yaml" /etc/bastion/state
images/out/cross/linux-amd64/bastiond --check-config "$owrt/bastion.yaml"
# LuCI's uhttpd holds 443 on most OpenWrt routers: the console must not.
sed -n '/^console:/,/^[^ #]/p' "$owrt/bastion.yaml" | grep -qx '  listen: ":8443"' || {
	echo "image.sh: the OpenWrt config's console does not listen on :8443:" >&2
	cat "$owrt/bastion.yaml" >&2
	exit 1
}

if [ "$(id -u)" -ne 0 ]; then
	if [ "${BASTION_REQUIRE_ALL:-}" = 1 ]; then
		echo "image.sh: building the appliance image needs root" >&2
		exit 1
	fi
	echo "image.sh: not root: skipping the image build and boot test (needs root)" >&2
	exit 0
fi

echo "-- images/build.sh"
t0=$(date +%s)
timeout 20m images/build.sh
echo "-- image build took $(( $(date +%s) - t0 ))s"

echo "-- boot test (qemu TCG)"
t0=$(date +%s)
BASTION_IMAGE_DIR="$PWD/images/out" timeout 15m \
	go test -count=1 -timeout 14m -run '^TestApplianceBoot$' -v ./images/boottest
echo "-- boot test took $(( $(date +%s) - t0 ))s"
