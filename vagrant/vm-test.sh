#!/usr/bin/env bash
# `vagrant up && pytest` on this host, confined and torn down (make vagrant-test):
#
#   vagrant/vm-test.sh            (root; Debian 12 with `make vagrant-deps`)
#
# Phases, each time-bounded and timed: deb (make deb, when dist/ has none), box (the
# local box, vagrant/build-box.sh, when the cached one is missing or older than the
# script), libvirt (libvirtd + virtlogd started here, inside a network namespace
# mq-vagrant-PID made for the run), up (relay, target, client: 1 vCPU, 768 MiB each),
# test (MASQUED_LAB=vagrant pytest -m any_lab tests/integration), then always, also
# after a failure or a signal: destroy (vagrant destroy -f), libvirt stopped, the
# namespace deleted, and a check that nothing is left (domain, network, bridge,
# namespace, disk image, process).
#
# Confinement: libvirtd, its dnsmasq, the VMs, vagrant and pytest all run in the
# namespace, which has no link to anything outside; every libvirt network is on
# 198.18.0.0/15 (Vagrant's management network 198.18.64.0/24, isolated, instead of the
# provider's 192.168.121.0/24 NAT; the lab's 198.18.1.0/24 and 198.19.0.0/24) and none
# forwards. The domain type is kvm when /dev/kvm works, else qemu (TCG); the VMs run
# under `nice`. One run at a time per host (a lock). Cached between runs (reused, not
# left over): the box in $MASQUED_VAGRANT_CACHE (default /var/cache/masqued-vagrant:
# masqued-bookworm.box and the added box under vagrant.d/; `make vagrant-clean` removes
# it).
#
# Environment: MASQUED_VAGRANT_ACCEL auto|kvm|tcg (default auto),
# MASQUED_VAGRANT_BUDGET total seconds (default 5400), MASQUED_VAGRANT_KEEP_LOGS=DIR
# (the VMs' serial consoles copied there), MASQUED_VAGRANT_PYTEST_ARGS (extra pytest
# arguments, e.g. -k ping).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

cache=${MASQUED_VAGRANT_CACHE:-/var/cache/masqued-vagrant}
budget=${MASQUED_VAGRANT_BUDGET:-5400}
accel=${MASQUED_VAGRANT_ACCEL:-auto}
box_name=masqued/bookworm-local
ns=mq-vagrant-$$
run=/var/tmp/$ns
mgmt_net=198.18.64.0/24
mgmt_name=$ns-mgmt
pool=$ns
prefix=$ns-
lab_nets=(masqued-clients masqued-targets "$mgmt_name")
start=$SECONDS
phases=()
failed=""

say() { echo "[vm-test $(date -u +%H:%M:%S)] $*"; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (libvirtd, network namespace)"
for tool in vagrant virsh libvirtd virtlogd qemu-system-x86_64 qemu-img dnsmasq ip flock timeout; do
    command -v "$tool" >/dev/null || die "$tool is missing: make vagrant-deps"
done
vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt || die "vagrant-libvirt is missing: make vagrant-deps"

# One VM lab at a time on this host (and a system libvirtd would be another one).
exec 8>/run/lock/mq-vagrant.lock
flock -n 8 || die "another vm-test holds /run/lock/mq-vagrant.lock"
if [ -S /run/libvirt/libvirt-sock ] || pgrep -x libvirtd >/dev/null; then
    die "a libvirtd is already running here: this harness starts its own"
fi

left() { echo $((budget - (SECONDS - start))); }

# phase NAME LIMIT CMD...: CMD bounded by LIMIT seconds (and what is left of the
# budget), its time recorded for the summary.
phase() {
    local name=$1 limit=$2 t0=$SECONDS rc=0
    shift 2
    [ "$limit" -le "$(left)" ] || limit=$(left)
    [ "$limit" -gt 0 ] || { phases+=("$name: not run (budget spent)"); failed=${failed:-$name}; return 1; }
    say "phase $name (limit ${limit}s)"
    if declare -F "$1" >/dev/null; then
        "$@" || rc=$?   # a function of this script: bounded by its own waits
    else
        timeout --kill-after=60 "$limit" "$@" || rc=$?
    fi
    phases+=("$name: $((SECONDS - t0))s$([ $rc = 0 ] || echo " FAILED (rc $rc$([ $rc = 124 ] && echo ", timed out"))")")
    say "phase $name: $((SECONDS - t0))s, rc $rc"
    [ $rc = 0 ] || failed=${failed:-$name}
    return $rc
}

kvm_works() {
    [ -c /dev/kvm ] || return 1
    # /dev/kvm can exist and still not run a Linux guest (nested virtualization without
    # the MSRs or CPUID a kernel needs: it hangs or qemu aborts). The test: the box's
    # kernel under KVM prints its banner within 20 s.
    local kernel pid ok=1
    kernel=$(find "$cache/vagrant.d/boxes" -name vmlinuz 2>/dev/null | head -1)
    [ -n "$kernel" ] || return 1
    qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -display none -monitor none \
        -serial "file:$run/kvm-probe.log" -kernel "$kernel" -no-reboot \
        -append "console=ttyS0 earlyprintk=ttyS0 panic=-1" >/dev/null 2>&1 &
    pid=$!
    for _ in $(seq 20); do
        grep -q "Linux version" "$run/kvm-probe.log" 2>/dev/null && { ok=0; break; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 1
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$run/kvm-probe.log"
    return $ok
}

# -- in the namespace ------------------------------------------------------------------
inns() { ip netns exec "$ns" "$@"; }
# vagrant (and pytest, which runs vagrant and ssh) in the namespace, with the lab's
# settings; "${vg[@]}" CMD... (an array, so that `timeout` can run it).
set_vg() {
    vg=(ip netns exec "$ns" env VAGRANT_HOME="$cache/vagrant.d" VAGRANT_DOTFILE_PATH="$run/dot" \
        VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_BOX_UPDATE_CHECK_DISABLE=1 \
        VAGRANT_DEFAULT_PROVIDER=libvirt LIBVIRT_DEFAULT_URI=qemu:///system \
        MASQUED_VAGRANT_BOX="$box_name" MASQUED_VAGRANT_CPUS=1 MASQUED_VAGRANT_MEMORY=768 \
        MASQUED_VAGRANT_DRIVER="$driver" MASQUED_VAGRANT_MGMT_NET="$mgmt_net" \
        MASQUED_VAGRANT_MGMT_NAME="$mgmt_name" MASQUED_VAGRANT_POOL="$pool" \
        MASQUED_VAGRANT_PREFIX="$prefix" MASQUED_VAGRANT_CONSOLE_DIR="$run/console" \
        MASQUED_VAGRANT_BOOT_TIMEOUT="$boot_timeout" MASQUED_LAB_TIME_SCALE="$scale")
}

start_libvirt() {
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    install -d -m 0755 "$run/pool" "$run/console"
    # Children inherit the namespace and the niceness: dnsmasq, qemu.
    inns nice -n 10 virtlogd -d
    inns nice -n 10 libvirtd -d
    for _ in $(seq 60); do
        virsh -q -c qemu:///system version >/dev/null 2>&1 && break
        sleep 1
    done
    virsh -q -c qemu:///system version >/dev/null || { say "libvirtd did not answer"; return 1; }
    virsh -q -c qemu:///system pool-create-as "$pool" dir --target "$run/pool" >/dev/null
    say "libvirtd $(cat /run/libvirtd.pid) in namespace $ns, pool $pool at $run/pool"
}

stop_libvirt() {
    local v=(virsh -q -c qemu:///system) d n
    if [ -S /run/libvirt/libvirt-sock ]; then
        for d in $("${v[@]}" list --all --name 2>/dev/null | grep "^$prefix" || true); do
            "${v[@]}" destroy "$d" >/dev/null 2>&1 || true
            "${v[@]}" undefine --nvram "$d" >/dev/null 2>&1 || "${v[@]}" undefine "$d" >/dev/null 2>&1 || true
        done
        for n in "${lab_nets[@]}"; do
            "${v[@]}" net-destroy "$n" >/dev/null 2>&1 || true
            "${v[@]}" net-undefine "$n" >/dev/null 2>&1 || true
        done
        "${v[@]}" pool-destroy "$pool" >/dev/null 2>&1 || true
    fi
    local pidfile pid
    for pidfile in /run/libvirtd.pid /run/virtlogd.pid; do
        pid=$(cat "$pidfile" 2>/dev/null || true)
        [ -n "$pid" ] || continue
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    # Whatever still runs in the namespace (a dnsmasq of a network libvirt could not
    # destroy, a qemu): the namespace's own processes, by pid.
    if ip netns list | grep -qw "$ns"; then
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
        sleep 2
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns delete "$ns"
    fi
    # The state libvirtd keeps of the networks and domains it ran (it leaves some behind
    # when its networks go with the namespace).
    for n in "${lab_nets[@]}"; do
        rm -rf "/var/lib/libvirt/dnsmasq/$n".* "/run/libvirt/network/$n" "/run/libvirt/network/$n".*
    done
    rm -f /var/log/libvirt/qemu/"$prefix"*.log
}

leftovers() {
    local found=()
    ip netns list | grep -qw "$ns" && found+=("namespace $ns")
    pgrep -x libvirtd >/dev/null && found+=("process libvirtd")
    pgrep -x virtlogd >/dev/null && found+=("process virtlogd")
    pgrep -f "dnsmasq.*/var/lib/libvirt/dnsmasq" >/dev/null && found+=("process dnsmasq (libvirt)")
    pgrep -f "qemu-system-x86_64.*$prefix" >/dev/null && found+=("process qemu ($prefix*)")
    [ -e "$run" ] && found+=("directory $run")
    local f
    for f in /etc/libvirt/qemu/"$prefix"*.xml /etc/libvirt/qemu/networks/{masqued-clients,masqued-targets,"$mgmt_name"}.xml \
             /var/lib/libvirt/images/*"$prefix"*; do
        [ -e "$f" ] && found+=("file $f")
    done
    # Disk images: the VMs' (in the run's pool, named $prefix*), a box build's, or any
    # qcow2 this run made in libvirt's or Vagrant's places (the cache keeps the box).
    while read -r f; do found+=("image $f"); done < <(find /var/lib/libvirt /var/tmp "$repo" \
        -xdev \( -name '*.qcow2' -o -name "$prefix*" -o -path '/var/tmp/mq-build-box.*' \) \
        -newer "$run.start" 2>/dev/null)
    for f in /run/libvirt/network/{masqued-clients,masqued-targets,"$mgmt_name"}*; do
        [ -e "$f" ] && found+=("libvirt state $f")
    done
    ip -o link show type bridge 2>/dev/null | grep -q virbr && found+=("bridge virbr* in the host's namespace")
    if [ ${#found[@]} -gt 0 ]; then
        say "left over:"; printf '  %s\n' "${found[@]}"
        return 1
    fi
    say "nothing left: no domain, network, bridge, namespace ($ns), disk image or process"
}

teardown() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ -d "$run/dot/machines" ] && ip netns list | grep -qw "$ns"; then
        phase destroy 600 "${vg[@]}" vagrant destroy -f
    fi
    if [ -n "${MASQUED_VAGRANT_KEEP_LOGS:-}" ] && [ -d "$run/console" ]; then
        mkdir -p "$MASQUED_VAGRANT_KEEP_LOGS" && cp -a "$run/console/." "$MASQUED_VAGRANT_KEEP_LOGS/"
    fi
    local t0=$SECONDS
    stop_libvirt
    rm -rf "$run"
    phases+=("teardown: $((SECONDS - t0))s")
    leftovers || { failed=${failed:-leftovers}; rc=1; }
    rm -f "$run.start"
    say "summary (accelerator $driver, time scale ${scale}x):"
    printf '  %s\n' "${phases[@]}"
    say "total: $((SECONDS - start))s"
    [ -z "$failed" ] || { say "FAILED at $failed"; [ "$rc" != 0 ] || rc=1; }
    exit "$rc"
}

driver=qemu scale=10 boot_timeout=1800 vg=()
mkdir -p "$run" "$cache"
touch "$run.start"
trap teardown EXIT
trap 'say "interrupted"; exit 130' INT TERM
case "$accel" in auto | kvm | tcg) ;; *) die "MASQUED_VAGRANT_ACCEL=$accel: use auto, kvm or tcg" ;; esac

# -- phases ------------------------------------------------------------------------------
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
deb=dist/masqued_${version}_amd64.deb
if [ ! -f "$deb" ]; then
    phase deb 1200 make deb
else
    phases+=("deb: $deb already built")
fi
[ -x .venv/bin/python ] || phase venv 900 make venv
phase pki 120 bash vagrant/prepare.sh "$deb"

want=$(sha256sum vagrant/build-box.sh | awk '{ print $1 }')
if [ -f "$cache/masqued-bookworm.box" ] && [ "$(cat "$cache/masqued-bookworm.box.sha256" 2>/dev/null)" = "$want" ] \
        && VAGRANT_HOME="$cache/vagrant.d" vagrant box list 2>/dev/null | grep -q "^$box_name "; then
    phases+=("box: cached in $cache")
else
    phase box 1500 bash vagrant/build-box.sh "$cache"
    phase box-add 300 env VAGRANT_HOME="$cache/vagrant.d" vagrant box add --force --name "$box_name" \
        "$cache/masqued-bookworm.box"
fi
case "$accel" in
    auto) if kvm_works; then driver=kvm; fi ;;
    kvm) driver=kvm ;;
    tcg) driver=qemu ;;
esac
if [ "$driver" = kvm ]; then scale=2 boot_timeout=600; fi
set_vg
say "domain type $driver ($([ "$driver" = kvm ] && echo KVM || echo "TCG: no usable KVM or MASQUED_VAGRANT_ACCEL=tcg")), time scale ${scale}x"

# qemu (user libvirt-qemu) reads the box's kernel and disk: the cache must be traversable.
chmod 0755 "$cache"

phase libvirt 120 start_libvirt

# The three VMs in parallel: each has one vCPU and the host two cores (one VM after
# the other leaves a core idle: relay 400 s alone, then target + client 760 s). The
# client's provisioning waits for its tunnel but does not fail when the relay is late.
phase up 2700 "${vg[@]}" vagrant up --provider=libvirt --parallel
# What the tests rely on, from the VMs themselves: the packaged relay runs.
phase check-vms 300 "${vg[@]}" vagrant ssh relay -c \
    'echo "relay: masqued@relay $(systemctl is-active masqued@relay), $(dpkg-query -W -f "\${Package} \${Version}" masqued) from the .deb"; systemctl is-active --quiet masqued@relay'

# shellcheck disable=SC2086 # extra pytest arguments, split on purpose
phase test 3600 "${vg[@]}" .venv/bin/python -m pytest -m any_lab -v -rA -p no:cacheprovider \
    ${MASQUED_VAGRANT_PYTEST_ARGS:-} tests/integration
