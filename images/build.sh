#!/usr/bin/env bash
# Builds the Bastion appliance image from Debian bookworm packages:
#
#   images/out/bastion-amd64.img   GPT disk: ESP (systemd-boot, kernel, initrd),
#                                  read-only ext4 root, ext4 state partition
#   images/out/vmlinuz             the kernel, for direct boot (qemu, CI)
#   images/out/initrd.img          its initramfs
#   images/out/cmdline             the kernel command line the ESP boots with
#   images/out/packages.txt        every Debian package and version inside
#   images/out/SHA256SUMS
#
# Needs root (mmdebstrap --mode=root, file ownership in the filesystems) but no
# loop devices and no mounts of the image: filesystems are made from
# directories (mke2fs -d, mtools) and placed into the disk file with dd.
# Downloaded .debs are kept in images/cache/apt, so a rebuild only fetches
# what changed on the mirror.
#
# Environment:
#   SOURCE_DATE_EPOCH      timestamps in the image (default: last commit time)
#   BASTION_MIRROR         Debian mirror (default http://deb.debian.org/debian)
#   BASTION_SECURITY_MIRROR  (default http://deb.debian.org/debian-security)
#   BASTION_BIN_DIR        use prebuilt linux/amd64 bastiond and bastionctl
#                          from this directory instead of building them
#   BASTION_IMAGE_OUT      output directory (default images/out)
#   BASTION_IMAGE_CACHE    cache directory (default images/cache)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${BASTION_IMAGE_OUT:-$here/out}
cache=${BASTION_IMAGE_CACHE:-$here/cache}
mirror=${BASTION_MIRROR:-http://deb.debian.org/debian}
secmirror=${BASTION_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=bookworm

# Fixed identifiers: the same inputs give the same bytes, and the kernel
# command line and fstab can name partitions before they exist.
disk_guid=6b0f6a0e-5e0c-4d1a-9c2b-0b6a5710b001
esp_partuuid=6b0f6a0e-5e0c-4d1a-9c2b-0b6a5710b0e1
root_partuuid=6b0f6a0e-5e0c-4d1a-9c2b-0b6a5710b0a1
state_partuuid=6b0f6a0e-5e0c-4d1a-9c2b-0b6a5710b051
root_fsuuid=6b0f6a0e-5e0c-4d1a-9c2b-0b6a5710f0a1
state_fsuuid=6b0f6a0e-5e0c-4d1a-9c2b-0b6a5710f051
esp_volid=B0A57105

esp_mib=128
state_mib=512
cmdline="root=PARTUUID=$root_partuuid ro rootfstype=ext4 net.ifnames=0 console=tty0 console=ttyS0,115200 panic=10 quiet"

packages=(
	systemd systemd-sysv udev dbus kmod
	linux-image-amd64 initramfs-tools zstd
	iptables iproute2 ca-certificates
	systemd-resolved systemd-timesyncd systemd-boot-efi
)

# Kernel modules for hardware a wired gateway never has. Leaving them out
# makes the image smaller and removes kernel code that a local process could
# otherwise get auto-loaded (e.g. by opening an AF_BLUETOOTH socket).
module_excludes=()
for m in sound drivers/media drivers/net/wireless net/mac80211 net/wireless drivers/bluetooth \
	net/bluetooth drivers/infiniband drivers/isdn drivers/staging net/nfc drivers/nfc; do
	module_excludes+=("--dpkgopt=path-exclude=/lib/modules/*/kernel/$m/*"
		"--dpkgopt=path-exclude=/usr/lib/modules/*/kernel/$m/*")
done

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap --mode=root and file ownership inside the image need it)"

host_tools=(mmdebstrap:mmdebstrap mke2fs:e2fsprogs debugfs:e2fsprogs sfdisk:fdisk mkfs.vfat:dosfstools mcopy:mtools
	systemctl:systemd systemd-sysusers:systemd)
missing=()
for t in "${host_tools[@]}"; do
	command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing host tools: ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v go >/dev/null 2>&1 || [ -n "${BASTION_BIN_DIR:-}" ] || die "go is not installed and BASTION_BIN_DIR is not set"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || true)
	[ -n "$SOURCE_DATE_EPOCH" ] || die "SOURCE_DATE_EPOCH unset and no git history to take it from"
fi
export SOURCE_DATE_EPOCH
# e2fsprogs takes its clock from here (superblock and inode times).
export E2FSPROGS_FAKE_TIME=$SOURCE_DATE_EPOCH
export TZ=UTC LC_ALL=C.UTF-8

work=$(mktemp -d "${TMPDIR:-/var/tmp}/bastion-image.XXXXXX")
cleanup() {
	# mmdebstrap unmounts what it mounted; make sure nothing is left before rm.
	for m in proc sys dev/pts dev; do
		mountpoint -q "$work/root/$m" 2>/dev/null && umount -l "$work/root/$m" || true
	done
	rm -rf --one-file-system "$work"
}
trap cleanup EXIT
start=$(date +%s)

# 1. The gateway binaries, static and reproducible.
bindir=$work/bin
mkdir -p "$bindir"
if [ -n "${BASTION_BIN_DIR:-}" ]; then
	cp "$BASTION_BIN_DIR/bastiond" "$BASTION_BIN_DIR/bastionctl" "$bindir/"
else
	log "building bastiond, bastionctl (linux/amd64, static)"
	(cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 GOFLAGS=-mod=readonly \
		go build -trimpath -buildvcs=false -ldflags "-s -w -buildid=" -o "$bindir/" ./cmd/bastiond ./cmd/bastionctl)
fi

# 2. The production config, written by bastiond itself so that its keys are
# always the ones the daemon knows, then validated by it.
"$bindir/bastiond" --write-default-config "$work/bastion.yaml" ||
	die "bastiond --write-default-config failed: this bastiond cannot write its production config"
[ -s "$work/bastion.yaml" ] || die "bastiond --write-default-config wrote nothing to $work/bastion.yaml"
"$bindir/bastiond" --check-config "$work/bastion.yaml" ||
	die "bastiond --check-config rejects its own default config"

# The image is built around three settings of that config: check them, so a
# changed default fails here and not on a box.
# (comments stripped: the file is bastiond's commented default)
cfg_plain=$(sed 's/[[:space:]]*#.*//' "$work/bastion.yaml")
fw_section=$(printf '%s\n' "$cfg_plain" | sed -n '/^firewall:/,/^[^ ]/p')
printf '%s\n' "$cfg_plain" | grep -qx 'state_dir: "/var/lib/bastion"' ||
	die "default config's state_dir is not /var/lib/bastion (the state partition's mount point)"
printf '%s\n' "$fw_section" | grep -qx '  lan: \["eth0"\]' ||
	die "default config's firewall.lan is not [eth0] (net.ifnames=0 names the NIC eth0)"
printf '%s\n' "$fw_section" | grep -qx '  manage: true' ||
	die "default config does not manage the firewall"
# A PC has no WPS key: on this appliance the pairing button is Scroll Lock
# (KEY_SCROLLLOCK, 70) held 1-10 s on a keyboard attached to the box, which
# nothing else on it uses (there is no shell). A PS/2 Pause key could not
# be held: it sends no release.
printf '%s\n' "$cfg_plain" | sed -n '/^pairing:/,/^[^ ]/p' | grep -qx '  input: "auto"' ||
	die "default config's pairing.input is not auto"
sed -i 's/^\(  key_code: \)529\b.*/\170      # KEY_SCROLLLOCK: hold Scroll Lock 1-10 s on a keyboard attached to the box/' "$work/bastion.yaml"
grep -q '^  key_code: 70 ' "$work/bastion.yaml" || die "could not set pairing.key_code to 70 (Scroll Lock)"
"$bindir/bastiond" --check-config "$work/bastion.yaml" || die "bastiond --check-config rejects the appliance's config"

# 3. The root filesystem from Debian packages.
mkdir -p "$cache/apt" "$out"
log "mmdebstrap $suite (${packages[*]})"
# merged-usr hooks: /usr is merged by mmdebstrap and usr-is-merged is
# installed early, so usrmerge (and the perl it pulls in) never is.
mmdebstrap --mode=root --variant=minbase --format=directory \
	--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
	--include="$(IFS=,; echo "${packages[*]}")" \
	--aptopt='APT::Install-Recommends "false"' \
	--aptopt='Acquire::Languages "none"' \
	--aptopt='Acquire::Retries "3"' \
	--dpkgopt='path-exclude=/usr/share/man/*' \
	--dpkgopt='path-exclude=/usr/share/info/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	--dpkgopt='path-exclude=/usr/share/doc/*' \
	--dpkgopt='path-include=/usr/share/doc/*/copyright' \
	"${module_excludes[@]}" \
	--skip=essential/unlink --skip=download/empty \
	--setup-hook='mkdir -p "$1/var/cache/apt/archives"' \
	--setup-hook="sync-in '$cache/apt' /var/cache/apt/archives/" \
	--essential-hook="mkdir -p \"\$1/etc/initramfs-tools/conf.d\" && cp '$here/rootfs/etc/initramfs-tools/conf.d/bastion.conf' \"\$1/etc/initramfs-tools/conf.d/\"" \
	--customize-hook="sync-out /var/cache/apt/archives '$cache/apt'" \
	--customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
	"$suite" "$work/root" \
	"deb $mirror $suite main" \
	"deb $mirror $suite-updates main" \
	"deb $secmirror $suite-security main"
# Keep the cache to what the current package set uses.
root=$work/root
(cd "$cache/apt" && ls -t -- *.deb 2>/dev/null | awk -F_ 'seen[$1]++' | xargs -r rm -f --)

# 4. Bastion on top.
log "installing bastion"
install -m 0755 -o root -g root "$bindir/bastiond" "$bindir/bastionctl" "$root/usr/bin/"
install -d -m 0755 "$root/etc/bastion"
install -m 0600 "$work/bastion.yaml" "$root/etc/bastion/bastion.yaml"
(cd "$here/rootfs" && find . -path ./etc/initramfs-tools -prune -o -type d -print) | while read -r d; do
	install -d -m 0755 "$root/$d"
done
(cd "$here/rootfs" && find . -path ./etc/initramfs-tools -prune -o -type f -print) | while read -r f; do
	if [ -x "$here/rootfs/$f" ]; then mode=0755; else mode=0644; fi
	install -m "$mode" -o root -g root "$here/rootfs/$f" "$root/$f"
done
install -d -m 0755 "$root/usr/share/doc/bastion"
install -m 0644 "$here/README.md" "$root/usr/share/doc/bastion/README.md"
# bastiond runs as user bastion, not root (bastiond.service). The user is
# made here because /etc is read-only on the box; sysusers numbers it the
# same way for the same package set, so builds stay reproducible.
systemd-sysusers --root="$root" "$root/usr/lib/sysusers.d/bastion.conf" ||
	die "systemd-sysusers could not create user bastion"
bastion_uid=$(awk -F: '$1 == "bastion" { print $3 }' "$root/etc/passwd")
bastion_gid=$(awk -F: '$1 == "bastion" { print $4 }' "$root/etc/passwd")
[ -n "$bastion_uid" ] && [ "$bastion_uid" != 0 ] && [ -n "$bastion_gid" ] ||
	die "user bastion missing or uid 0 in the image's /etc/passwd"
# The config holds no secret, but only bastiond needs to read it.
chown "0:$bastion_gid" "$root/etc/bastion/bastion.yaml"
chmod 0640 "$root/etc/bastion/bastion.yaml"
install -d -m 0700 -o "$bastion_uid" -g "$bastion_gid" "$root/var/lib/bastion"

cat > "$root/etc/fstab" <<EOF
# The root filesystem is read-only; everything that changes lives on the
# state partition or in RAM.
PARTUUID=$root_partuuid / ext4 ro,noatime 0 1
PARTUUID=$state_partuuid /var/lib/bastion ext4 rw,noatime,nosuid,nodev,noexec 0 2
tmpfs /tmp tmpfs rw,nosuid,nodev,mode=1777,size=64M 0 0
tmpfs /var/tmp tmpfs rw,nosuid,nodev,mode=1777,size=16M 0 0
tmpfs /var/log tmpfs rw,nosuid,nodev,noexec,mode=0755,size=16M 0 0
tmpfs /var/lib/systemd tmpfs rw,nosuid,nodev,noexec,mode=0755,size=8M 0 0
EOF
echo bastion > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tbastion\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
# mmdebstrap copies these from the build host, modes included.
chmod 0644 "$root/etc/hostname" "$root/etc/hosts"
# An empty machine-id on a read-only root: systemd makes a fresh one in /run
# on every boot instead of all boxes sharing the one baked in here.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
ln -sf ../run/systemd/resolve/resolv.conf "$root/etc/resolv.conf"

systemctl --root="$root" enable bastiond.service bastion-console.service bastion-screen.service \
	systemd-networkd.service systemd-resolved.service systemd-timesyncd.service >/dev/null 2>&1
# No login prompt anywhere: the appliance has no accounts to log in to and
# no password to guess. The setup code is shown instead.
systemctl --root="$root" mask getty.target console-getty.service \
	serial-getty@.service getty@.service systemd-firstboot.service \
	apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
	fstrim.timer >/dev/null 2>&1

# Accounts: root stays locked ("*" in shadow, set by base-passwd); check it.
root_pw=$(awk -F: '$1 == "root" { print $2 }' "$root/etc/shadow")
case "$root_pw" in
'*' | '!'* | '*'*) ;;
*) die "root has a usable password in the image" ;;
esac
for svc in sshd dropbear telnetd inetd; do
	[ ! -e "$root/usr/sbin/$svc" ] || die "$svc is in the image"
done

# Kernel and initrd leave the root filesystem: they are booted from the ESP.
kver=$(basename "$(ls -d "$root"/usr/lib/modules/* | sort -V | tail -n1)")
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
rm -f "$root"/boot/vmlinuz* "$root"/boot/initrd* "$root"/vmlinuz* "$root"/initrd*

dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package}\t${Version}\t${Architecture}\n' | sort > "$work/packages.txt"
rm -rf "$root/var/cache/apt"/*.bin "$root/var/lib/apt/lists"/* "$root/var/log"/* "$root/tmp"/* "$root/var/tmp"/*

# Clamp every timestamp so the filesystem does not record when it was built.
find "$root" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0r touch -h --no-dereference -d "@$SOURCE_DATE_EPOCH"

# mke2fs -d copies each file's ctime, which no tool can set on the source,
# and its atime, which every read after the clamp above moves again (relatime);
# set both to SOURCE_DATE_EPOCH inside the new filesystem instead.
clamp_times() {
	local src=$1 fs=$2 out
	(cd "$src" && find . -mindepth 1 | sed 's|^\.||') |
		awk -v t="@$SOURCE_DATE_EPOCH" 'index($0, " ") == 0 { print "sif " $0 " ctime " t; print "sif " $0 " atime " t }
			END { print "sif / ctime " t; print "sif / atime " t }' \
			> "$work/ctime.cmds"
	if (cd "$src" && find . -name '* *' | grep -q .); then
		die "$src has file names with spaces, which clamp_times cannot pass to debugfs"
	fi
	out=$(debugfs -w -f "$work/ctime.cmds" "$fs" 2>&1 | grep -v '^debugfs' || true)
	[ -z "$out" ] || die "debugfs ctime clamp on $fs: $out"
}

# 5. Filesystems, made from directories: no loop device, no mount.
log "making filesystems"
root_kib=$(du -sk --apparent-size "$root" | cut -f1)
root_mib=$(( (root_kib * 13 / 10) / 1024 + 64 ))
mke2fs -q -F -t ext4 -L bastion-root -U "$root_fsuuid" -E "hash_seed=$root_fsuuid,root_owner=0:0" \
	-O ^has_journal,^metadata_csum_seed -m 0 -b 4096 -d "$root" "$work/root.ext4" "${root_mib}M"
clamp_times "$root" "$work/root.ext4"
mkdir -p "$work/state"
chmod 0700 "$work/state"
# mke2fs -d may take the root's owner from the directory; both say bastion.
chown "$bastion_uid:$bastion_gid" "$work/state"
touch -d "@$SOURCE_DATE_EPOCH" "$work/state"
mke2fs -q -F -t ext4 -L bastion-state -U "$state_fsuuid" -E "hash_seed=$state_fsuuid,root_owner=$bastion_uid:$bastion_gid" \
	-m 0 -b 4096 -d "$work/state" "$work/state.ext4" "${state_mib}M"
clamp_times "$work/state" "$work/state.ext4"

# ESP: systemd-boot, one entry, no command-line editor at the boot menu.
esp=$work/esp
mkdir -p "$esp/EFI/BOOT" "$esp/loader/entries" "$esp/bastion"
cp "$root/usr/lib/systemd/boot/efi/systemd-bootx64.efi" "$esp/EFI/BOOT/BOOTX64.EFI"
printf 'default bastion.conf\ntimeout 0\neditor no\n' > "$esp/loader/loader.conf"
printf 'title Bastion gateway\nlinux /bastion/vmlinuz\ninitrd /bastion/initrd.img\noptions %s\n' "$cmdline" > "$esp/loader/entries/bastion.conf"
cp "$work/vmlinuz" "$work/initrd.img" "$esp/bastion/"
find "$esp" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
rm -f "$work/esp.vfat"
mkfs.vfat -C --invariant -F 32 -n ESP -i "$esp_volid" "$work/esp.vfat" $((esp_mib * 1024)) >/dev/null
(cd "$esp" && mcopy -i "$work/esp.vfat" -s -m -Q ./* ::/)

# 6. The disk: GPT, 1 MiB aligned, partitions copied in at their offsets.
log "assembling disk"
esp_start=2048
esp_sectors=$((esp_mib * 2048))
root_start=$((esp_start + esp_sectors))
root_sectors=$((root_mib * 2048))
state_start=$((root_start + root_sectors))
state_sectors=$((state_mib * 2048))
total_sectors=$((state_start + state_sectors + 2048))
img=$work/bastion-amd64.img
rm -f "$img"
truncate -s $((total_sectors * 512)) "$img"
sfdisk --quiet --no-reread --no-tell-kernel "$img" <<EOF
label: gpt
label-id: $disk_guid
unit: sectors
first-lba: 2048
start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid=$esp_partuuid, name="ESP"
start=$root_start, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, uuid=$root_partuuid, name="bastion-root", attrs="GUID:60"
start=$state_start, size=$state_sectors, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, uuid=$state_partuuid, name="bastion-state"
EOF
dd if="$work/esp.vfat" of="$img" bs=512 seek=$esp_start conv=notrunc,sparse status=none
dd if="$work/root.ext4" of="$img" bs=512 seek=$root_start conv=notrunc,sparse status=none
dd if="$work/state.ext4" of="$img" bs=512 seek=$state_start conv=notrunc,sparse status=none

# 7. Publish.
rm -f "$out"/bastion-amd64.img "$out"/vmlinuz "$out"/initrd.img "$out"/cmdline "$out"/packages.txt "$out"/SHA256SUMS "$out"/layout.env
cp --sparse=always "$img" "$out/"
cp "$work/vmlinuz" "$work/initrd.img" "$work/packages.txt" "$out/"
echo "$cmdline" > "$out/cmdline"
# Partition offsets for tools (the boot test) that read the filesystems
# without mounting them.
cat > "$out/layout.env" <<EOF
KERNEL_VERSION=$kver
SECTOR_SIZE=512
ESP_START=$esp_start
ROOT_START=$root_start
STATE_START=$state_start
ROOT_PARTUUID=$root_partuuid
STATE_PARTUUID=$state_partuuid
EOF
(cd "$out" && sha256sum bastion-amd64.img vmlinuz initrd.img cmdline packages.txt layout.env > SHA256SUMS)

log "done in $(( $(date +%s) - start ))s: kernel $kver, root ${root_mib} MiB, disk $((total_sectors / 2048)) MiB"
(cd "$out" && ls -ls bastion-amd64.img vmlinuz initrd.img && cat SHA256SUMS) >&2
