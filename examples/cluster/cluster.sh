#!/usr/bin/env bash
# A three-node FleetLM cluster on this machine (docs/OPERATIONS.md, "Running a cluster").
#
#   examples/cluster/cluster.sh start          # create the database, start nodes 1-3
#   examples/cluster/cluster.sh status         # fleetlm cluster status
#   examples/cluster/cluster.sh restart        # rolling restart: each node drained, restarted, ready
#   examples/cluster/cluster.sh kill 2         # kill -9 node 2 (its shards fail over)
#   examples/cluster/cluster.sh up 2           # start node 2 again and wait until it is ready
#   examples/cluster/cluster.sh replace 2      # node 2 lost its disk: stop it, wipe its data,
#                                              # forget-node, start it empty, add-node
#   examples/cluster/cluster.sh stop           # drain and stop every node
#
# Nodes listen for HTTP on 127.0.0.1:4001-4003 and for peers on 127.0.0.1:4101-4103 and keep
# their data in ./cluster-data/nodeN. FLEETLM names the binary (default: fleetlm on PATH),
# DATABASE (default postgres://postgres@127.0.0.1:5432/fleetlm_cluster) the shared archive.
set -euo pipefail

FLEETLM=${FLEETLM:-fleetlm}
DATABASE=${DATABASE:-postgres://postgres@127.0.0.1:5432/fleetlm_cluster}
DATA=${DATA:-./cluster-data}
SECRET_FILE="$DATA/secret"
MEMBERS_FILE="$DATA/members"

members() { cat "$MEMBERS_FILE"; }
peers() { local list=""; for id in $(members); do list+="${list:+,}$id=127.0.0.1:$((4100 + id))"; done; echo "$list"; }
http_port() { echo $((4000 + $1)); }

start_node() {
  local id=$1
  mkdir -p "$DATA/node$id"
  FLEETLM_CLUSTER_SECRET=$(cat "$SECRET_FILE") nohup "$FLEETLM" serve --node-id "$id" \
    --cluster-peers "$(peers)" --http-addr "127.0.0.1:$(http_port "$id")" \
    --data-dir "$DATA/node$id" --database-url "$DATABASE" >"$DATA/node$id.log" 2>&1 &
  echo $! >"$DATA/node$id.pid"
  echo "node $id: pid $!, http://127.0.0.1:$(http_port "$id"), log $DATA/node$id.log"
}

wait_ready() {
  local id=$1
  for _ in $(seq 1 150); do
    if curl -sf "http://127.0.0.1:$(http_port "$id")/health/ready" >/dev/null; then
      echo "node $id ready"
      return 0
    fi
    sleep 0.2
  done
  echo "node $id is not ready after 30 s; see $DATA/node$id.log" >&2
  return 1
}

stop_node() {
  local id=$1 pid
  pid=$(cat "$DATA/node$id.pid" 2>/dev/null || true)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" # drain: leadership handed over, sockets closed with 1012, archive flushed
  while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
  echo "node $id stopped"
}

case "${1:-}" in
  start)
    mkdir -p "$DATA"
    [ -f "$SECRET_FILE" ] || head -c 24 /dev/urandom | base64 >"$SECRET_FILE"
    [ -f "$MEMBERS_FILE" ] || echo "1 2 3" >"$MEMBERS_FILE"
    psql "${DATABASE%/*}/postgres" -qc "CREATE DATABASE ${DATABASE##*/}" 2>/dev/null || true
    for id in $(members); do start_node "$id"; done
    for id in $(members); do wait_ready "$id"; done
    ;;
  status)
    "$FLEETLM" cluster status --url "http://127.0.0.1:$(http_port "$(members | cut -d' ' -f1)")"
    ;;
  restart)
    for id in $(members); do
      stop_node "$id"
      start_node "$id"
      wait_ready "$id"
    done
    ;;
  kill)
    kill -9 "$(cat "$DATA/node${2:?which node}.pid")"
    echo "node $2 killed"
    ;;
  up)
    start_node "${2:?which node}"
    wait_ready "$2"
    ;;
  replace)
    id=${2:?which node}
    other=""
    for m in $(members); do if [ "$m" != "$id" ]; then other=$m; break; fi; done
    pid=$(cat "$DATA/node$id.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -rf "$DATA/node$id" # the lost disk
    "$FLEETLM" cluster forget-node --url "http://127.0.0.1:$(http_port "$other")" --node-id "$id"
    start_node "$id"
    "$FLEETLM" cluster add-node --url "http://127.0.0.1:$(http_port "$other")" --node-id "$id"
    wait_ready "$id"
    ;;
  stop)
    for id in $(members); do stop_node "$id"; done
    ;;
  *)
    sed -n '2,15p' "$0"
    exit 2
    ;;
esac
