# Shared by scripts/demo and bench/authority: an N-node pqmesh whose nodes
# join through a keyd authority. Source scripts/lib/mesh.sh first, then:
#   auth_up N ROTATION      # authority + N nodes joined by token and running
#   auth_join I             # node I (namespace already there) joins and starts
#   auth_revoke I           # revoke node I at the authority
#   auth_down               # everything removed (also on trap)
# The authority runs in its own namespace at 192.168.77.254 (QUIC 51830);
# its state is in $MESH_WORK/authority. Node I's overlay address is
# $MESH_OVERLAY.I when nodes join in order (the pool is 10.77.0.0/24).

AUTH_NS=pqda$MESH_TAG
AUTH_DIR=$MESH_WORK/authority
AUTH_IP=192.168.77.254
AUTH_PID=""
MESH_OVERLAY=10.77.0

auth_keyd() { echo "${KEYD:-$PWD/target/release/keyd}"; }

auth_down() {
  set +e
  [ -n "$AUTH_PID" ] && kill "$AUTH_PID" 2>/dev/null
  ip netns del "$AUTH_NS" 2>/dev/null
  mesh_down
}

# auth_start: (re)starts the authority process on its state directory.
auth_start() {
  ip netns exec "$AUTH_NS" "$(auth_keyd)" authority run --dir "$AUTH_DIR" 2>>"$MESH_WORK/authority.log" &
  AUTH_PID=$!
  MESH_PIDS+=("$AUTH_PID")
  for _ in $(seq 100); do [ -S "$AUTH_DIR/admin.sock" ] && return 0; sleep 0.05; done
  echo "the authority did not start; its log:" >&2
  cat "$MESH_WORK/authority.log" >&2
  return 1
}

# auth_stop: kill -9, as a crash would.
auth_stop() {
  kill -9 "$AUTH_PID" 2>/dev/null
  wait "$AUTH_PID" 2>/dev/null
  rm -f "$AUTH_DIR/admin.sock"
}

# auth_token [ARGS...]: a join token (default: one use, one hour).
auth_token() {
  "$(auth_keyd)" authority token create --dir "$AUTH_DIR" "$@"
}

# auth_join I [TOKEN]: node I enrolls (with TOKEN, or a fresh one-use token),
# then starts mesh-node and keyd. Sets AUTH_JOIN_S (seconds the join took).
auth_join() {
  local i=$1 token=${2:-} keyd meshnode ns d ifname t0
  keyd=$(auth_keyd) meshnode=${MESH_NODE:-$PWD/target/release/mesh-node}
  ns=$(mesh_ns "$i") d=$MESH_WORK/node$i ifname=$(mesh_if "$i")
  [ -n "$token" ] || token=$(auth_token --group demo)
  t0=$(date +%s.%N)
  echo "$token" | ip netns exec "$ns" "$keyd" join - --dir "$d" --name "node$i" \
    --interface "$ifname" --quic-listen "192.168.77.$i:51821" --json > "$d.join.json"
  AUTH_JOIN_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.3f", b - a}')
  local addr
  addr=$(grep -o '"10\.77\.[0-9.]*/[0-9]*"' "$d.join.json" | head -1 | tr -d '"')
  echo "$addr" > "$d/overlay"
  # Short rotations so the demo shows one; the default is 2 minutes.
  sed -i "s/^persistent_keepalive = 25$/persistent_keepalive = 25\nrotation_interval = \"${AUTH_ROTATION:-120s}\"/" "$d/keyd.toml"
  ip netns exec "$ns" "$meshnode" up "$ifname" --foreground --log-file "$d/mesh-node.log" &
  MESH_PIDS+=($!)
  for _ in $(seq 100); do [ -S "/var/run/wireguard/$ifname.sock" ] && break; sleep 0.05; done
  ip -n "$ns" addr add "$addr" dev "$ifname"
  ip -n "$ns" link set "$ifname" up
  ip netns exec "$ns" "$keyd" run --config "$d/keyd.toml" 2>"$d/keyd.log" &
  MESH_PIDS+=($!)
  KEYD_PIDS+=($!)
}

# auth_net N: the bridge, N node namespaces and the authority's namespace.
auth_net() {
  local n=$1
  mesh_net "$n"
  ip netns add "$AUTH_NS"
  ip link add "dn$MESH_TAG-a" type veth peer name "dl$MESH_TAG-a"
  ip link set "dn$MESH_TAG-a" netns "$AUTH_NS"
  ip link set "dl$MESH_TAG-a" netns "pqdl$MESH_TAG"
  ip -n "pqdl$MESH_TAG" link set "dl$MESH_TAG-a" master br0 up
  ip -n "$AUTH_NS" link set "dn$MESH_TAG-a" name eth0
  ip -n "$AUTH_NS" addr add "$AUTH_IP/24" dev eth0
  ip -n "$AUTH_NS" link set eth0 up
  ip -n "$AUTH_NS" link set lo up
}

# auth_up N ROTATION: the authority, and N nodes that join one by one.
auth_up() {
  local n=$1
  AUTH_ROTATION=$2
  MESH_N=$n
  auth_net "$n"
  "$(auth_keyd)" authority init --dir "$AUTH_DIR" --network demo \
    --listen "$AUTH_IP:51830" --pool-v4 10.77.0.0/24 --pool-v6 fd77::/64 >/dev/null
  auth_start
  MESH_START=$(date +%s.%N)
  for i in $(seq 1 "$n"); do auth_join "$i"; done
}

# auth_revoke I: node I revoked at the authority (every certificate it had).
auth_revoke() {
  "$(auth_keyd)" authority node revoke --dir "$AUTH_DIR" "node$1" >/dev/null
}

# auth_peers I: how many peers node I's data plane holds.
auth_peers() {
  ip netns exec "$(mesh_ns "$1")" wg show "$(mesh_if "$1")" peers 2>/dev/null | grep -c . || true
}
