#!/usr/bin/env bash
# regen-patch.sh DIR: rewrite third_party/patches/DIR.patch as the
# difference between the upstream release (from the module proxy) and the
# copy in third_party/DIR. Run it after changing a copy; the test command's
# third-party check then proves copy = release + patch.
set -euo pipefail
cd "$(dirname "$0")"
dir=$1
read -r mod ver < <(sed -n "s/^check $dir \([^ ]*\) \([^ ]*\)$/\1 \2/p" ../scripts/test.d/third-party.sh)
[ -n "${mod:-}" ] || { echo "regen-patch: $dir is not checked in scripts/test.d/third-party.sh" >&2; exit 1; }
src=$(cd .. && GOFLAGS=-mod=mod go mod download -json "$mod@$ver" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/a/$dir" && cp -r "$src/." "$tmp/a/$dir/" && chmod -R u+w "$tmp/a/$dir"
rm -rf "$tmp/a/$dir/examples" "$tmp/a/$dir/e2e"
ln -s "$PWD/$dir" "$tmp/b"
# diff exits 1 when the trees differ, which is the point.
(cd "$tmp/a" && diff -ruN "$dir" "../b" || true) |
  sed -e "s#^diff -ruN $dir/\(.*\) ../b/.*#diff -ruN $dir/\1 $dir/\1#" \
      -e "s#^\(---\) $dir/\([^	]*\).*#\1 $dir/\2#" \
      -e "s#^\(+++\) ../b/\([^	]*\).*#\1 $dir/\2#" > "patches/$dir.patch"
echo "regen-patch: patches/$dir.patch: $(grep -c '^diff ' "patches/$dir.patch") files"
