#!/usr/bin/env bash
# Local services for integration tests and local runs, on loopback, without Docker:
#   kafka     Apache Kafka (KRaft, one combined broker/controller) from Maven Central jars
#   postgres  PostgreSQL from Debian's packages (initdb + pg_ctl into a directory of its own)
#   redis     Redis from Debian's packages
#
#   infra/local/services.sh start [SERVICE...]   start (default: all); idempotent
#   infra/local/services.sh stop [SERVICE...]
#   infra/local/services.sh status [SERVICE...]  exit 0 when every named service answers
#   infra/local/services.sh env                  the addresses, as shell exports
#
# A service whose tools are missing (Java/Maven; PostgreSQL/Redis and no root to install them)
# is skipped with a one-line reason and exit 0, so the tests skip too; with CDI_REQUIRE_SERVICES=1
# (CI) that is an error. Tests find the services through the variables `env` prints.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STATE="${CDI_SERVICES_DIR:-${TMPDIR:-/tmp}/cdi-services}"
KAFKA_VERSION="${CDI_KAFKA_VERSION:-4.1.1}"
KAFKA_PORT="${CDI_KAFKA_PORT:-19092}"
KAFKA_CONTROLLER_PORT=$((KAFKA_PORT + 1))
PG_PORT="${CDI_POSTGRES_PORT:-55432}"
REDIS_PORT="${CDI_REDIS_PORT:-56379}"
REQUIRE="${CDI_REQUIRE_SERVICES:-0}"
ALL=(kafka postgres redis)

log() { printf '%s\n' "services: $*" >&2; }

# A tool is missing: skip (exit status 2 of the service function), or fail when required.
unavailable() {
  if [[ "$REQUIRE" == "1" ]]; then
    log "$1: unavailable: $2 (CDI_REQUIRE_SERVICES=1)"
    return 1
  fi
  log "$1: skipped: $2"
  return 2
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() { # NAME SECONDS COMMAND...
  local name="$1" seconds="$2"
  shift 2
  for _ in $(seq 1 $((seconds * 4))); do
    if "$@"; then return 0; fi
    sleep 0.25
  done
  log "$name: did not come up within ${seconds}s (logs in $STATE/$name/)"
  return 1
}

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

as_apt_root() { # install Debian packages when we may; else say what to install
  local name="$1"
  shift
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
    log "$name: installing $* from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 || {
      apt-get update -qq >/dev/null 2>&1 || true
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    }
    return 0
  fi
  return 1
}

# --- kafka -------------------------------------------------------------------------------------

kafka_ready() { port_open "$KAFKA_PORT" && grep -q "Kafka Server started" "$STATE/kafka/logs/server.log" 2>/dev/null; }

start_kafka() {
  local dir="$STATE/kafka" lib="$STATE/kafka/lib-$KAFKA_VERSION-2"  # -2: with the log binding
  if pid_alive "$dir/kafka.pid" && kafka_ready; then
    log "kafka: running at 127.0.0.1:$KAFKA_PORT"
    return 0
  fi
  command -v java >/dev/null || { unavailable kafka "no java (Java 17+ is needed)"; return; }
  if [[ ! -f "$lib/.complete" ]]; then
    command -v mvn >/dev/null || { unavailable kafka "no mvn to fetch the broker's jars"; return; }
    log "kafka: fetching kafka_2.13 $KAFKA_VERSION and its dependencies with mvn"
    mkdir -p "$lib"
    # (set -e does not reach into a function called from a condition: check each step)
    mvn -q -B -Dstyle.color=never -f "$ROOT/infra/local/kafka/pom.xml" dependency:copy-dependencies \
      -Dkafka.version="$KAFKA_VERSION" -DincludeScope=runtime -DoutputDirectory="$lib" \
      >"$dir/mvn.log" 2>&1 ||
      { log "kafka: mvn could not fetch the broker's jars (see $dir/mvn.log)"; rm -rf "$lib"; return 1; }
    touch "$lib/.complete"
  fi
  mkdir -p "$dir/logs"
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.quorum.bootstrap.servers=127.0.0.1:$KAFKA_CONTROLLER_PORT
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# Keep everything: tests and replays produce records with historical timestamps, which the
# default 7-day time retention would delete within minutes.
log.retention.ms=-1
EOF
  local java=(java -Xms256m -Xmx512m "-Dkafka.logs.dir=$dir/logs"
    "-Dlog4j2.configurationFile=$ROOT/infra/local/kafka/log4j2.properties" -cp "$lib/*")
  if [[ ! -f "$dir/data/meta.properties" ]]; then # an unformatted broker exits at once
    local cluster
    cluster="$("${java[@]}" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -1)"
    "${java[@]}" kafka.tools.StorageTool format --cluster-id "$cluster" --standalone \
      --config "$dir/server.properties" >"$dir/logs/format.log" 2>&1 ||
      { log "kafka: formatting the storage failed (see $dir/logs/format.log)"; return 1; }
  fi
  : >"$dir/logs/server.log"
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >"$dir/logs/stdout.log" 2>&1 &
  echo $! >"$dir/kafka.pid"
  wait_for kafka 90 kafka_ready || return 1
  log "kafka: started at 127.0.0.1:$KAFKA_PORT (Kafka $KAFKA_VERSION, KRaft)"
}

stop_kafka() {
  local pidfile="$STATE/kafka/kafka.pid"
  if pid_alive "$pidfile"; then
    kill "$(cat "$pidfile")"
    wait_for kafka 30 bash -c "! kill -0 $(cat "$pidfile") 2>/dev/null" || kill -9 "$(cat "$pidfile")"
  fi
  rm -f "$pidfile"
}

# --- postgres ----------------------------------------------------------------------------------

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

as_pg() { # PostgreSQL refuses to run as root: root runs it as the postgres user
  if [[ "$(id -u)" == "0" ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_ready() { as_pg "$(pg_bin)/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

start_postgres() {
  local dir="$STATE/postgres"
  if [[ -z "$(pg_bin)" ]]; then
    as_apt_root postgres postgresql ||
      { unavailable postgres "PostgreSQL is not installed (apt-get install postgresql)"; return; }
  fi
  local bin
  bin="$(pg_bin)"
  if [[ -f "$dir/data/postmaster.pid" ]] && pg_ready; then
    log "postgres: running at 127.0.0.1:$PG_PORT"
    return 0
  fi
  mkdir -p "$dir"
  [[ "$(id -u)" == "0" ]] && chown postgres: "$dir" && chmod o+x "$STATE"
  if [[ ! -f "$dir/data/PG_VERSION" ]]; then
    as_pg "$bin/initdb" -D "$dir/data" -U cdi --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1 ||
      { log "postgres: initdb failed (see $dir/initdb.log)"; return 1; }
  fi
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start \
    -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" >/dev/null ||
    { log "postgres: did not start (see $dir/postgres.log)"; return 1; }
  wait_for postgres 30 pg_ready || return 1
  as_pg "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U cdi -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname = 'cdi'" | grep -q 1 ||
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U cdi cdi
  log "postgres: started at 127.0.0.1:$PG_PORT (database cdi, user cdi)"
}

stop_postgres() {
  local dir="$STATE/postgres"
  if [[ -n "$(pg_bin)" && -f "$dir/data/postmaster.pid" ]]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
  fi
}

# --- redis -------------------------------------------------------------------------------------

redis_ready() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; }

start_redis() {
  local dir="$STATE/redis"
  if ! command -v redis-server >/dev/null; then
    as_apt_root redis redis-server ||
      { unavailable redis "Redis is not installed (apt-get install redis-server)"; return; }
  fi
  if redis_ready; then
    log "redis: running at 127.0.0.1:$REDIS_PORT"
    return 0
  fi
  mkdir -p "$dir"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  wait_for redis 30 redis_ready || return 1
  log "redis: started at 127.0.0.1:$REDIS_PORT"
}

stop_redis() {
  if redis_ready; then redis-cli -h 127.0.0.1 -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true; fi
}

# --- commands ----------------------------------------------------------------------------------

print_env() {
  echo "export CDI_KAFKA_BOOTSTRAP=127.0.0.1:$KAFKA_PORT"
  echo "export CDI_POSTGRES_URL=postgresql://cdi@127.0.0.1:$PG_PORT/cdi"
  echo "export CDI_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
}

status_of() {
  case "$1" in
    kafka) kafka_ready ;;
    postgres) [[ -n "$(pg_bin)" ]] && pg_ready ;;
    redis) command -v redis-cli >/dev/null && redis_ready ;;
  esac
}

main() {
  local cmd="${1:-}"
  shift || true
  local names=("$@")
  [[ ${#names[@]} -eq 0 ]] && names=("${ALL[@]}")
  for n in "${names[@]}"; do
    [[ " ${ALL[*]} " == *" $n "* ]] || { log "unknown service '$n' (one of: ${ALL[*]})"; exit 2; }
  done
  case "$cmd" in
    start)
      mkdir -p "$STATE"
      local failed=0
      for n in "${names[@]}"; do
        local rc=0
        "start_$n" || rc=$?
        [[ $rc -eq 1 ]] && failed=1
      done
      print_env
      return $failed
      ;;
    stop) for n in "${names[@]}"; do "stop_$n"; done ;;
    status)
      local down=0
      for n in "${names[@]}"; do
        if status_of "$n"; then echo "$n: up"; else echo "$n: down"; down=1; fi
      done
      return $down
      ;;
    env) print_env ;;
    *)
      sed -n '2,14p' "$0" >&2
      exit 2
      ;;
  esac
}

main "$@"
