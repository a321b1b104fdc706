#!/usr/bin/env bash
# Static router builds of bastiond, bastionctl and devicesim for every
# architecture Bastion supports, with their sizes, and a size budget check.
#
#   images/cross.sh                 build all into images/out/cross/<target>/
#   images/cross.sh linux/arm64     build only the named targets
#
# Environment:
#   BASTION_CROSS_OUT     output directory (default images/out/cross)
#   BASTION_MAX_BIN_MIB   size budget per binary in MiB (default 25)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
outdir=${BASTION_CROSS_OUT:-$here/out/cross}
max_mib=${BASTION_MAX_BIN_MIB:-25}
max_bytes=$((max_mib * 1024 * 1024))
cmds=(bastiond bastionctl devicesim)

# target name -> GOOS GOARCH extra-env
all_targets=(linux/amd64 linux/arm64 linux/arm/v7 linux/mipsle)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# readelf's Machine line for each target, to catch a build for the wrong CPU.
machine_for() {
	case "$1" in
	linux/amd64) echo "X86-64" ;;
	linux/arm64) echo "AArch64" ;;
	linux/arm/v7) echo "ARM" ;;
	linux/mipsle) echo "MIPS" ;;
	esac
}

env_for() {
	case "$1" in
	linux/amd64) echo "GOOS=linux GOARCH=amd64" ;;
	linux/arm64) echo "GOOS=linux GOARCH=arm64" ;;
	linux/arm/v7) echo "GOOS=linux GOARCH=arm GOARM=7" ;;
	# Most MIPS routers (MT7621, ath79) have no FPU.
	linux/mipsle) echo "GOOS=linux GOARCH=mipsle GOMIPS=softfloat" ;;
	*) return 1 ;;
	esac
}

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

fail=0
printf '%-14s %-11s %12s %9s\n' target binary bytes MiB
for t in "${targets[@]}"; do
	e=$(env_for "$t") || { echo "cross.sh: unknown target $t (know: ${all_targets[*]})" >&2; exit 2; }
	dir=$outdir/${t//\//-}
	mkdir -p "$dir"
	# shellcheck disable=SC2086 # e is a list of VAR=value words
	(cd "$repo" && env $e CGO_ENABLED=0 GOFLAGS=-mod=readonly \
		go build -trimpath -buildvcs=false -ldflags "-s -w -buildid=" -o "$dir/" \
		$(printf './cmd/%s ' "${cmds[@]}"))
	for c in "${cmds[@]}"; do
		f=$dir/$c
		[ -f "$f" ] || { echo "cross.sh: $t: $c was not built" >&2; fail=1; continue; }
		# A static binary has no program interpreter; catch a cgo leak.
		if readelf -l "$f" 2>/dev/null | grep -q 'Requesting program interpreter'; then
			echo "cross.sh: $t: $c is dynamically linked (cgo crept in)" >&2
			fail=1
		fi
		m=$(readelf -h "$f" | sed -n 's/^ *Machine: *//p')
		case "$m" in
		*"$(machine_for "$t")"*) ;;
		*) echo "cross.sh: $t: $c is built for '$m'" >&2; fail=1 ;;
		esac
		if [ "$t" = linux/mipsle ] && ! readelf -h "$f" | grep -q 'little endian'; then
			echo "cross.sh: $t: $c is not little endian" >&2
			fail=1
		fi
		size=$(stat -c %s "$f")
		printf '%-14s %-11s %12d %9.2f\n' "$t" "$c" "$size" "$(awk -v s="$size" 'BEGIN { print s / 1048576 }')"
		if [ "$size" -gt "$max_bytes" ]; then
			echo "cross.sh: $t: $c is $size bytes, over the ${max_mib} MiB budget" >&2
			fail=1
		fi
	done
done
(cd "$outdir" && find . -type f -printf '%P\n' | sort | xargs sha256sum > SHA256SUMS)
[ "$fail" -eq 0 ] || { echo "cross.sh: FAILED" >&2; exit 1; }
echo "cross.sh: all binaries static and within ${max_mib} MiB; output in $outdir"
