# Shared by scripts/demo and bench/mesh: an N-node pqmesh in network
# namespaces on one bridge, each node with mesh-node and keyd. Source it,
# then: mesh_up N ROTATION; mesh_wait_complete; ...; mesh_down (also on trap).
# Globals it sets: MESH_TAG MESH_WORK MESH_PIDS KEYD_PIDS MESH_START MESH_COMPLETE_AT.

MESH_TAG=$$
MESH_WORK=$(mktemp -d /tmp/pqmesh-mesh.XXXXXX)
MESH_PIDS=()
KEYD_PIDS=()
MESH_N=0
MESH_GC_THRESH3=""
# Node i's overlay address is $MESH_OVERLAY.i (scripts/lib/authority.sh
# sets it to the authority's pool).
MESH_OVERLAY=10.99.0

mesh_ns() { echo "pqd$MESH_TAG-$1"; }
mesh_if() { echo "pq${MESH_TAG}n$1"; }

mesh_down() {
  set +e
  for p in "${MESH_PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${MESH_PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  for i in $(seq 1 "$MESH_N"); do ip netns del "$(mesh_ns "$i")" 2>/dev/null; done
  ip netns del "pqdl$MESH_TAG" 2>/dev/null
  rm -rf "$MESH_WORK"
  if [ -n "$MESH_GC_THRESH3" ]; then
    echo "$MESH_GC_THRESH3" > /proc/sys/net/ipv4/neigh/default/gc_thresh3
    MESH_GC_THRESH3=""
  fi
  MESH_PIDS=() KEYD_PIDS=()
}

# mesh_net N: the bridge namespace and N node namespaces on it
# (underlay 192.168.77.i/24).
mesh_net() {
  local n=$1
  local lan=pqdl$MESH_TAG
  ip netns add "$lan"
  ip -n "$lan" link add br0 type bridge
  ip -n "$lan" link set br0 up
  for i in $(seq 1 "$n"); do
    local ns; ns=$(mesh_ns "$i")
    ip netns add "$ns"
    ip link add "dn$MESH_TAG-$i" type veth peer name "dl$MESH_TAG-$i"
    ip link set "dn$MESH_TAG-$i" netns "$ns"
    ip link set "dl$MESH_TAG-$i" netns "$lan"
    ip -n "$lan" link set "dl$MESH_TAG-$i" master br0 up
    ip -n "$ns" link set "dn$MESH_TAG-$i" name eth0
    ip -n "$ns" addr add "192.168.77.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

# mesh_up N ROTATION: builds the network, identities and roster, starts daemons.
mesh_up() {
  local n=$1 rotation=$2 keyd=${KEYD:-$PWD/target/release/keyd} meshnode=${MESH_NODE:-$PWD/target/release/mesh-node}
  MESH_N=$n
  # Every namespace's ARP entries count against one kernel-wide neighbour
  # table (gc_thresh3, 1024 by default): the bridge namespace alone holds
  # N entries and each node N-1, so past ~32 nodes the table overflows
  # ("neighbor table overflow") and pings fail. Raised for the mesh's
  # lifetime, put back by mesh_down.
  local need=$(( 4 * n * n ))
  local cur; cur=$(cat /proc/sys/net/ipv4/neigh/default/gc_thresh3)
  if [ "$cur" -lt "$need" ]; then
    MESH_GC_THRESH3=$cur
    echo "$need" > /proc/sys/net/ipv4/neigh/default/gc_thresh3
  fi
  mesh_net "$n"
  "$keyd" ca create --network demo --name demo-ca --dir "$MESH_WORK/ca" >/dev/null
  local members=()
  for i in $(seq 1 "$n"); do
    local d=$MESH_WORK/node$i
    "$keyd" key generate --dir "$d" >/dev/null
    "$keyd" cert issue --ca-dir "$MESH_WORK/ca" --name "node$i" --address "10.99.0.$i/24" \
      --group demo --key-dir "$d" --out "$d/node.crt" >/dev/null
    members+=(--member "$d/node.crt,wg=192.168.77.$i:51820,keyd=192.168.77.$i:51821")
  done
  "$keyd" roster build --ca-dir "$MESH_WORK/ca" "${members[@]}" --out "$MESH_WORK/roster" >/dev/null
  MESH_START=$(date +%s.%N)
  for i in $(seq 1 "$n"); do
    local ns d ifname
    ns=$(mesh_ns "$i") d=$MESH_WORK/node$i ifname=$(mesh_if "$i")
    # /var/run/wireguard is shared by all namespaces: names must differ.
    ip netns exec "$ns" "$meshnode" up "$ifname" --foreground --log-file "$d/mesh-node.log" &
    MESH_PIDS+=($!)
    for _ in $(seq 100); do [ -S "/var/run/wireguard/$ifname.sock" ] && break; sleep 0.05; done
    ip -n "$ns" addr add "10.99.0.$i/24" dev "$ifname"
    ip -n "$ns" link set "$ifname" up
    cat > "$d/keyd.toml" <<CONF
interface = "$ifname"
quic_listen = "192.168.77.$i:51821"
ca_cert = "../ca/ca.crt"
cert = "node.crt"
wg_key = "wg.key"
noise_key = "noise.key"
roster = "../roster"
state_dir = "state"
rotation_interval = "$rotation"
persistent_keepalive = 25
CONF
    ip netns exec "$ns" "$keyd" run --config "$d/keyd.toml" 2>"$d/keyd.log" &
    MESH_PIDS+=($!)
    KEYD_PIDS+=($!)
  done
}

# mesh_wait_complete [TIMEOUT_S]: until every ordered pair passes a ping.
mesh_wait_complete() {
  local timeout=${1:-60} t0; t0=$(date +%s)
  while [ $(( $(date +%s) - t0 )) -lt "$timeout" ]; do
    local ok=1
    for i in $(seq 1 "$MESH_N"); do
      for j in $(seq 1 "$MESH_N"); do
        [ "$i" = "$j" ] && continue
        ip netns exec "$(mesh_ns "$i")" ping -c 1 -W 1 -q "$MESH_OVERLAY.$j" >/dev/null 2>&1 || { ok=0; break 2; }
      done
    done
    if [ $ok = 1 ]; then MESH_COMPLETE_AT=$(date +%s.%N); return 0; fi
    sleep 0.2
  done
  return 1
}

# mesh_wait_handshakes [TIMEOUT_S]: until every node's data plane has
# completed a WireGuard handshake with every other node (keys agreed by keyd
# and in use; the persistent keepalive starts a handshake as soon as a peer
# is installed). One `wg show` per node per pass, where pinging every
# ordered pair would take tens of seconds at N=64.
mesh_wait_handshakes() {
  local timeout=${1:-60} t0; t0=$(date +%s)
  while [ $(( $(date +%s) - t0 )) -lt "$timeout" ]; do
    local ok=1
    for i in $(seq 1 "$MESH_N"); do
      local hs
      hs=$(ip netns exec "$(mesh_ns "$i")" wg show "$(mesh_if "$i")" latest-handshakes 2>/dev/null \
        | awk '$2 > 0' | wc -l)
      [ "$hs" -eq $(( MESH_N - 1 )) ] || { ok=0; break; }
    done
    if [ $ok = 1 ]; then MESH_COMPLETE_AT=$(date +%s.%N); return 0; fi
    sleep 0.1
  done
  return 1
}

# mesh_count FIELD: a per-peer counter of keyd status (exchanges_failed,
# dials_unanswered, ...) summed over every node's peers. Failures are
# counted by the dialing side, and each exchange has one dialer.
mesh_count() {
  local total=0 keyd=${KEYD:-$PWD/target/release/keyd}
  for i in $(seq 1 "$MESH_N"); do
    local f
    f=$("$keyd" status --config "$MESH_WORK/node$i/keyd.toml" --json 2>/dev/null \
      | grep -o "\"$1\": [0-9]*" | awk '{s += $2} END {print s + 0}')
    total=$(( total + f ))
  done
  echo "$total"
}
