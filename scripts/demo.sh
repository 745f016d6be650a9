#!/usr/bin/env bash
# masqued demo: a relay and a client in network namespaces, a tunnel between them,
# traffic through it, NAT seen at the target, then everything torn down.
#
#   mq-demo-client (198.18.1.2) --veth-- mq-demo-relay (198.18.1.1 | 198.19.0.1) --veth-- mq-demo-target (198.19.0.2)
#
# The client has no route to 198.19.0.0/24 except through the tunnel; the target has
# no route back to the client pool, so every reply it sends goes to the relay's NAT.
set -euo pipefail
cd "$(dirname "$0")/.."
MASQUED=${MASQUED:-$PWD/.venv/bin/masqued}
PY=${PY:-$PWD/.venv/bin/python}
C=mq-demo-client R=mq-demo-relay T=mq-demo-target
WORK=$(mktemp -d /tmp/masqued-demo.XXXXXX)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
  set +e
  for pid in ${CLIENT_PID:-} ${RELAY_PID:-} ${SERVER_PID:-}; do kill "$pid" 2>/dev/null; done
  wait 2>/dev/null
  for ns in $C $R $T; do ip netns del "$ns" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

say "network namespaces"
for ns in $C $R $T; do ip netns del "$ns" 2>/dev/null || true; ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add mq-demo-c netns $C type veth peer name mq-demo-rc netns $R
ip link add mq-demo-rt netns $R type veth peer name mq-demo-t netns $T
ip -n $C addr add 198.18.1.2/24 dev mq-demo-c && ip -n $C link set mq-demo-c up
ip -n $R addr add 198.18.1.1/24 dev mq-demo-rc && ip -n $R link set mq-demo-rc up
ip -n $R addr add 198.19.0.1/24 dev mq-demo-rt && ip -n $R link set mq-demo-rt up
ip -n $T addr add 198.19.0.2/24 dev mq-demo-t && ip -n $T link set mq-demo-t up
ip -n $R route add default via 198.19.0.2      # the relay's egress ("egress = auto")
echo "client 198.18.1.2 -- relay 198.18.1.1 | 198.19.0.1 -- target 198.19.0.2"
printf '$ ip netns exec %s ping -c1 -W1 198.19.0.2   # before the tunnel\n' $C
ip netns exec $C ping -c1 -W1 198.19.0.2 >/dev/null 2>&1 && echo "reachable?!" || echo "unreachable, as expected"

say "certificates (masqued pki)"
run "$MASQUED" pki init "$WORK/pki"
run "$MASQUED" pki relay "$WORK/pki" --name relay.example --san 198.18.1.1
run "$MASQUED" pki client "$WORK/pki" --name alice

say "configs"
cat > "$WORK/relay.conf" <<CONF
mode = "relay"
listen = "0.0.0.0:443"
certificate = "$WORK/pki/relay.example.pem"
private_key = "$WORK/pki/relay.example.key"
pool = ["198.18.200.0/24"]
egress = "auto"
nat = "auto"
auth = "mtls"                       # only clients with a certificate from our CA
client_ca = "$WORK/pki/ca.pem"
CONF
cat > "$WORK/client.conf" <<CONF
mode = "client"
relay = "198.18.1.1:443"
server_name = "relay.example"
ca = "$WORK/pki/ca.pem"
routes = ["198.19.0.0/24"]
certificate = "$WORK/pki/alice.pem"
private_key = "$WORK/pki/alice.key"
CONF
chmod 600 "$WORK"/*.conf
run "$MASQUED" check --config "$WORK/relay.conf"
run "$MASQUED" check --config "$WORK/client.conf"

say "start relay and client"
ip netns exec $R "$MASQUED" run --config "$WORK/relay.conf" >"$WORK/relay.log" 2>&1 & RELAY_PID=$!
sleep 1
ip netns exec $C "$MASQUED" run --config "$WORK/client.conf" >"$WORK/client.log" 2>&1 & CLIENT_PID=$!
for _ in $(seq 50); do ip -n $C -4 addr show dev mq-client 2>/dev/null | grep -q inet && break; sleep 0.2; done
sed 's/^/  relay | /' "$WORK/relay.log"; sed 's/^/  client| /' "$WORK/client.log"
run ip -n $C -4 addr show dev mq-client
run ip -n $C rule show
run ip -n $C route show table all proto 109

say "traffic through the tunnel"
run ip netns exec $C ping -c 5 -i 0.2 198.19.0.2
ip netns exec $T "$PY" -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.19.0.2", 8080)); s.listen()
while True:
    c, a = s.accept(); n = 0
    while (d := c.recv(65536)): n += len(d)
    print(f"target: received {n} bytes from {a[0]}", flush=True); c.close()
' > "$WORK/target.log" 2>&1 & SERVER_PID=$!
sleep 0.5
printf '$ send 20 MB over TCP from the client to 198.19.0.2:8080\n'
ip netns exec $C "$PY" -c '
import socket, time
s = socket.create_connection(("198.19.0.2", 8080)); buf = b"x" * 65536; t = time.monotonic()
for _ in range(320): s.sendall(buf)
s.close(); dt = time.monotonic() - t
print(f"client: sent 20 MB in {dt:.2f}s = {20*8*1.048576/dt:.0f} Mbit/s")'
sleep 0.5
cat "$WORK/target.log"
echo "(198.19.0.1 is the relay's egress address: the target saw NAT, not the client pool)"
run ip netns exec $R nft list table inet masqued_relay

say "stop (SIGTERM) and check that nothing is left behind"
kill -TERM $CLIENT_PID $RELAY_PID; wait $CLIENT_PID $RELAY_PID || true
CLIENT_PID= RELAY_PID=
tail -n 4 "$WORK/relay.log" | sed 's/^/  relay | /'
left=$( { ip -n $C link show mq-client; ip -n $R link show mq-relay; ip netns exec $R nft list table inet masqued_relay; ip -n $C rule show | grep 5210; } 2>/dev/null || true)
if [ -n "$left" ]; then echo "LEFT BEHIND:"; echo "$left"; exit 1; fi
echo "clean: no TUN, rule, route or nft table of masqued remains"
say "demo done"
