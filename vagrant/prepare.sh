#!/usr/bin/env bash
# Host side of the Vagrant lab (the Vagrantfile runs it before `vagrant up`/`provision`;
# running it by hand is fine too):
#
#   vagrant/prepare.sh [DEB]
#
# 1. The package the VMs install: DEB (default dist/masqued_<version>_amd64.deb) is
#    built on the host with `make deb` when missing (needs root and Debian's packaging
#    tools, which `make deps` installs); otherwise it says how to build it.
#    The VMs never build: they install exactly the .deb the system tests check.
# 2. The lab's PKI in vagrant/pki, made once by `masqued pki` (the repository's .venv):
#    ca.pem, relay.example.pem/.key (also valid for 198.18.1.1 and 2001:db8:1::1, the
#    relay's lab addresses), client.pem/.key, client2.*, client3.* (one certificate per
#    client VM, for the relay's auth = "mtls").
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
deb=${1:-dist/masqued_${version}_amd64.deb}
pki=vagrant/pki

# Providers bring VMs up in parallel: one preparation at a time.
if command -v flock >/dev/null; then
    exec 9>vagrant/.prepare.lock
    flock 9
fi

if [ ! -f "$deb" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "masqued lab: building $deb (make deb)"
        make deb
    else
        echo "masqued lab: $deb is missing. Build it first (Debian 12 host):" >&2
        echo "    sudo make deb" >&2
        exit 1
    fi
    [ -f "$deb" ] || { echo "masqued lab: make deb did not produce $deb" >&2; exit 1; }
fi
echo "masqued lab: package $deb"

masqued=.venv/bin/masqued
need() {
    [ -f "$pki/$1.key" ] && return 1
    if [ ! -x "$masqued" ]; then
        echo "masqued lab: $masqued is missing (it makes the lab's certificates): make venv" >&2
        exit 1
    fi
}
if need ca; then
    rm -rf "$pki"
    "$masqued" pki init "$pki" --name "masqued lab CA"
fi
if need relay.example; then
    "$masqued" pki relay "$pki" --name relay.example --san 198.18.1.1 --san 2001:db8:1::1
fi
# One identity per client VM (the relay keeps a client's address by identity).
for client in client client2 client3; do
    if need "$client"; then
        "$masqued" pki client "$pki" --name "$client"
    fi
done
echo "masqued lab: certificates in $pki"
