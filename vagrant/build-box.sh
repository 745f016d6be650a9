#!/usr/bin/env bash
# Builds the lab's Vagrant box from Debian packages, for hosts without Vagrant Cloud:
#
#   vagrant/build-box.sh [OUT_DIR]     (root; default OUT_DIR /var/cache/masqued-vagrant)
#
# A Debian 12 root file system made by mmdebstrap from the configured Debian mirror, as
# one ext4 file system on the whole disk (no partition table, no bootloader), packed as
# a libvirt box: box.img (qcow2), metadata.json, a Vagrantfile that boots the box's own
# kernel and initramfs (vmlinuz, initrd.img, from linux-image-amd64) directly, through
# the libvirt provider's kernel/initrd/cmd_line. The box has everything the lab's VMs
# need (vagrant/provision.sh: python3, iproute2, nftables, iptables, tcpdump, the .deb's
# dependencies), so provisioning needs no network. The vagrant user has Vagrant's
# well-known insecure public key (Debian's vagrant package ships it); Vagrant replaces
# it at the first `vagrant up`.
#
# Writes OUT_DIR/masqued-bookworm.box; `vagrant box add` is done by the caller
# (vagrant/vm-test.sh), which also keeps the built box as a cache: a box is rebuilt only
# when this script changes (its sha256 is in OUT_DIR/masqued-bookworm.box.sha256).
set -euo pipefail

out=${1:-/var/cache/masqued-vagrant}
suite=${MASQUED_BOX_SUITE:-bookworm}
mirror=${MASQUED_BOX_MIRROR:-http://deb.debian.org/debian}
size=${MASQUED_BOX_SIZE:-4G}
pubkey=${MASQUED_BOX_PUBKEY:-$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -1)}

say() { echo "[build-box] $*"; }
die() { echo "[build-box] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, file ownership in the image)"
for tool in mmdebstrap mkfs.ext4 qemu-img tar; do
    command -v "$tool" >/dev/null || die "$tool is missing: make vagrant-deps"
done
[ -n "$pubkey" ] && [ -f "$pubkey" ] || die "Vagrant's insecure public key not found (Debian's vagrant package)"

# The packages the lab needs in every VM (provision.sh and the .deb's Depends), and what
# Vagrant needs: sshd, sudo, rsync (synced folder), ifupdown + a DHCP client (Vagrant's
# Debian guest support configures the private networks in /etc/network/interfaces).
packages=(
    systemd systemd-sysv udev dbus kmod netbase
    linux-image-amd64 initramfs-tools
    openssh-server sudo rsync ifupdown isc-dhcp-client
    python3 python3.11 libxtables12 libip4tc2 libip6tc2
    iproute2 iputils-ping nftables iptables procps tcpdump
    ca-certificates less
)

work=$(mktemp -d /var/tmp/mq-build-box.XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
root=$work/root
mkdir -p "$out"

say "mmdebstrap $suite from $mirror into $root"
mmdebstrap --variant=apt --quiet \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --customize-hook='echo masqued-box > "$1/etc/hostname"' \
    "$suite" "$root" "$mirror"

say "configuring the image"
cat > "$root/etc/fstab" <<'EOF'
/dev/vda / ext4 defaults,errors=remount-ro 0 1
EOF
cat > "$root/etc/network/interfaces" <<'EOF'
# Vagrant's NIC (the management network, DHCP); Vagrant appends the private networks.
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
EOF
# Each VM makes its own machine id at its first boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# Vagrant: user vagrant, passwordless sudo, the insecure key.
chroot "$root" useradd --create-home --shell /bin/bash vagrant
uid=$(chroot "$root" id -u vagrant)
gid=$(chroot "$root" id -g vagrant)
install -d -m 0700 -o "$uid" -g "$gid" "$root/home/vagrant/.ssh"
install -m 0600 -o "$uid" -g "$gid" "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > "$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"
# Quicker ssh logins on a slow (TCG) VM: no reverse DNS, no motd/last-login lookups.
cat > "$root/etc/ssh/sshd_config.d/vagrant.conf" <<'EOF'
UseDNS no
PrintLastLog no
EOF
# Less work at boot under TCG: no periodic maintenance in a short-lived lab VM.
for t in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer \
         fstrim.timer dpkg-db-backup.timer; do
    chroot "$root" systemctl disable "$t" >/dev/null 2>&1 || true
done
chroot "$root" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
# The lab services are enabled by provision.sh; keep nftables' own unit out of the way.
chroot "$root" systemctl disable nftables.service >/dev/null 2>&1 || true
# The kernel and initramfs go next to the disk (direct kernel boot).
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$(ls "$root"/boot/initrd.img-* | sort -V | tail -1)
[ -f "$kernel" ] && [ -f "$initrd" ] || die "no kernel/initramfs in the image"
mkdir "$work/box"
cp "$kernel" "$work/box/vmlinuz"
cp "$initrd" "$work/box/initrd.img"
chmod 0644 "$work/box/vmlinuz" "$work/box/initrd.img"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*

say "ext4 image ($size) and qcow2"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw" "$size"
qemu-img convert -c -f raw -O qcow2 "$work/root.raw" "$work/box/box.img"
rm -f "$work/root.raw"
gib=${size%G}
cat > "$work/box/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $gib}
EOF
cat > "$work/box/Vagrantfile" <<'EOF'
# masqued's local Debian 12 box (vagrant/build-box.sh): direct kernel boot, no bootloader.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 biosdevname=0 quiet"
  end
end
EOF
tar -C "$work/box" -czf "$out/masqued-bookworm.box.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img
mv "$out/masqued-bookworm.box.tmp" "$out/masqued-bookworm.box"
sha256sum "$0" | awk '{ print $1 }' > "$out/masqued-bookworm.box.sha256"
say "wrote $out/masqued-bookworm.box ($(du -h "$out/masqued-bookworm.box" | cut -f1))"
