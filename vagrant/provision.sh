#!/usr/bin/env bash
# Provisions one VM of the Vagrant lab (run by the Vagrantfile, as root, in the VM):
#
#   provision.sh ROLE DEB V4=V6...
#
# ROLE is relay, target, client, client2 or client3; DEB the masqued package built on the
# host (synced to /vagrant); each V4=V6 pairs an IPv4 address Vagrant configured with
# the IPv6 address the same interface gets here (Vagrant's IPv6 support differs between
# providers, so the guest adds it itself, at every boot).
#
# relay, clients: install the .deb, the lab's certificates (vagrant/pki, made on the host
# by `masqued pki`), /etc/masque/NAME.conf made from the package's example config, and
# start masqued@relay / masqued@client. target: the test servers as a unit,
# masqued-lab-servers. Every host: the test helpers in /usr/local/lib/masqued-lab.
# Idempotent: `vagrant provision` after `make deb` installs the new package.
set -euo pipefail

role=${1:?usage: provision.sh ROLE DEB V4=V6...}
deb=${2:?usage: provision.sh ROLE DEB V4=V6...}
shift 2
src=/vagrant
# The lab's certificates (vagrant/prepare.sh); MASQUED_LAB_PKI: elsewhere (a rehearsal).
pki_src=${MASQUED_LAB_PKI:-$src/vagrant/pki}
helpers=/usr/local/lib/masqued-lab
export DEBIAN_FRONTEND=noninteractive

say() { echo "[masqued-lab $role] $*"; }
die() { echo "[masqued-lab $role] error: $*" >&2; exit 1; }

# -- lab addresses ------------------------------------------------------------------------
install -d -m 0755 /etc/masqued-lab
: > /etc/masqued-lab/addresses
for pair in "$@"; do
    echo "${pair%%=*} ${pair#*=}" >> /etc/masqued-lab/addresses
done
cat > /usr/local/sbin/masqued-lab-net <<'SCRIPT'
#!/bin/sh
# Gives each lab interface (found by the IPv4 address Vagrant configured on it) its IPv6
# address from /etc/masqued-lab/addresses ("V4 V6" per line). Run at boot.
set -eu
while read -r v4 v6; do
    [ -n "$v4" ] || continue
    dev=""
    for _ in $(seq 60); do
        dev=$(ip -o -4 addr show to "$v4/32" | awk '{ print $2; exit }')
        [ -n "$dev" ] && break
        sleep 1
    done
    [ -n "$dev" ] || { echo "masqued-lab-net: no interface has $v4" >&2; exit 1; }
    if [ "$(cat "/proc/sys/net/ipv6/conf/$dev/disable_ipv6")" != 0 ]; then
        sysctl -qw "net.ipv6.conf.$dev.disable_ipv6=0"
    fi
    ip -6 addr replace "$v6/64" dev "$dev" nodad
    echo "masqued-lab-net: $dev $v4 $v6"
done < /etc/masqued-lab/addresses
SCRIPT
chmod 0755 /usr/local/sbin/masqued-lab-net
cat > /etc/systemd/system/masqued-lab-net.service <<'UNIT'
[Unit]
Description=masqued lab: IPv6 addresses of the lab networks
After=network.target
Before=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/masqued-lab-net

[Install]
WantedBy=multi-user.target network-online.target
UNIT
systemctl daemon-reload
systemctl enable masqued-lab-net.service
systemctl restart masqued-lab-net.service
say "addresses: $(ip -br addr | tr -s ' ' | paste -sd ';')"

# -- packages -----------------------------------------------------------------------------
# Only what the box lacks (the local box, vagrant/build-box.sh, has them all: its VMs
# have no mirror). MASQUED_LAB_NO_APT=1: never use apt's mirrors (a rehearsal of this
# script in containers); the .deb is still installed.
missing=()
for p in python3 iproute2 iputils-ping nftables iptables procps tcpdump; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ] && [ "${MASQUED_LAB_NO_APT:-0}" != 1 ]; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
install -d -m 0755 "$helpers"
for f in servers.py traffic.py rawclient.py udpload.py; do
    install -m 0644 "$src/tests/integration/$f" "$helpers/$f"
done

if [ "$role" = target ]; then
    cat > /etc/systemd/system/masqued-lab-servers.service <<UNIT
[Unit]
Description=masqued lab: test servers (tests/integration/servers.py)
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 -u $helpers/servers.py
Restart=on-failure

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable masqued-lab-servers.service
    systemctl restart masqued-lab-servers.service
    say "servers: masqued-lab-servers.service $(systemctl is-active masqued-lab-servers.service)"
    exit 0
fi

# -- masqued --------------------------------------------------------------------------------
[ -f "$deb" ] || die "$deb is missing: build it on the host (sudo make deb), then vagrant provision"
[ -f "$pki_src/ca.pem" ] || die "$pki_src is missing: run vagrant/prepare.sh on the host"
# --reinstall: a rebuilt package with the same version replaces the installed one too.
apt-get install -y -qq --no-install-recommends --reinstall "$deb" >/dev/null
say "installed $(dpkg-query -W -f '${Package} ${Version}' masqued)"

install -d -m 0700 /etc/masque/pki
install -m 0644 "$pki_src/ca.pem" /etc/masque/pki/ca.pem

# setkey FILE KEY VALUE: the first "KEY = ..." line (commented out or not) becomes
# "KEY = VALUE"; the example's comments stay.
setkey() {
    grep -qE "^#? ?$2 = " "$1" || die "$1 has no $2 line"
    sed -i -E "0,/^#? ?$2 = .*/s||$2 = $3|" "$1"
}

case "$role" in
relay)
    name=relay
    install -m 0644 "$pki_src/relay.example.pem" /etc/masque/pki/relay.example.pem
    install -m 0600 "$pki_src/relay.example.key" /etc/masque/pki/relay.example.key
    # Egress: the interface towards the target (a VM's default route is Vagrant's NIC).
    egress=$(ip -o -4 addr show to 198.19.0.1/32 | awk '{ print $2; exit }')
    [ -n "$egress" ] || die "no interface has 198.19.0.1"
    conf=/etc/masque/relay.conf
    install -m 0600 /usr/share/doc/masqued/examples/relay.conf "$conf"
    setkey "$conf" certificate '"/etc/masque/pki/relay.example.pem"'
    setkey "$conf" private_key '"/etc/masque/pki/relay.example.key"'
    setkey "$conf" egress "\"$egress\""
    ;;
client*)
    name=client
    # Its own identity: the certificate named like the VM (vagrant/prepare.sh).
    install -m 0644 "$pki_src/$role.pem" "/etc/masque/pki/$role.pem"
    install -m 0600 "$pki_src/$role.key" "/etc/masque/pki/$role.key"
    conf=/etc/masque/client.conf
    install -m 0600 /usr/share/doc/masqued/examples/client.conf "$conf"
    setkey "$conf" relay '"198.18.1.1:443"'
    setkey "$conf" server_name '"relay.example"'
    setkey "$conf" routes '["198.19.0.0/24", "2001:db8:19::/64"]'
    setkey "$conf" certificate "\"/etc/masque/pki/$role.pem\""
    setkey "$conf" private_key "\"/etc/masque/pki/$role.key\""
    ;;
*)
    die "unknown role $role"
    ;;
esac
masqued check "$name"
systemctl enable "masqued@$name.service"

if [ "$name" = relay ]; then
    systemctl restart "masqued@relay.service"   # Type=notify: returns once READY
    say "masqued@relay $(systemctl is-active masqued@relay.service); nft: $(nft list tables | grep masqued || true)"
    exit 0
fi

# The relay may still be booting (providers bring VMs up in parallel): the client keeps
# retrying by itself, so wait a while but do not fail the provisioning for it.
systemctl restart --no-block "masqued@client.service"
for _ in $(seq 120); do
    [ "$(systemctl is-active masqued@client.service)" = active ] && break
    sleep 1
done
if [ "$(systemctl is-active masqued@client.service)" = active ]; then
    say "masqued@client active; ping through the tunnel:"
    ping -c 3 -W 2 198.19.0.2 || say "no reply yet from 198.19.0.2"
else
    say "masqued@client not up yet (is the relay up?):"
    journalctl -u masqued@client.service -n 20 --no-pager || true
fi
