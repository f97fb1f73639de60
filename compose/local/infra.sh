#!/usr/bin/env bash
# Local infrastructure for Switchboard: a single-node Apache Kafka 4.1.0
# (KRaft, broker + controller) built from the jars on Maven Central, and a
# Debian redis-server. Both run as plain background processes on 127.0.0.1,
# with their data under $SWITCHBOARD_STATE (default: <repo>/.local).
#
#   infra.sh up | down | status | restart-kafka | restart-redis | clean | env
#
# See compose/local/README.md for the details and the environment variables.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

KAFKA_VERSION=4.1.0
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
REDIS_PORT="${REDIS_PORT:-6379}"
STATE="${SWITCHBOARD_STATE:-$REPO_ROOT/.local}"
CACHE="${SWITCHBOARD_CACHE:-$HOME/.cache/switchboard}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m}"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-60}"
REDIS_START_TIMEOUT="${REDIS_START_TIMEOUT:-30}"
REDIS_STOP_TIMEOUT="${REDIS_STOP_TIMEOUT:-30}"

KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
KAFKA_LIBS="$KAFKA_HOME/libs"
KAFKA_LIBS_MARKER="$KAFKA_LIBS/.complete"
KAFKA_POM="$SCRIPT_DIR/kafka-pom.xml"
KAFKA_DIR="$STATE/kafka"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_LOG="$KAFKA_DIR/server.log"
KAFKA_OUT="$KAFKA_DIR/kafka.out"
KAFKA_PID="$KAFKA_DIR/kafka.pid"
# The line the broker logs once it is fully up (KafkaRaftServer.startup, 4.1.0):
#   [KafkaRaftServer nodeId=1] Kafka Server started (kafka.server.KafkaRaftServer)
KAFKA_READY_LINE='Kafka Server started (kafka.server.KafkaRaftServer)'

REDIS_DIR="$STATE/redis"
REDIS_CONF="$REDIS_DIR/redis.conf"
REDIS_PID="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"

log() { printf '[infra] %s\n' "$*" >&2; }
die() { printf '[infra] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- helpers ---

port_open() { # port_open HOST PORT: true when something accepts TCP there
  (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

pid_alive() { # a running process; a zombie waiting to be reaped counts as exited
  [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null || return 1
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0 # no procfs: trust kill -0
  stat=${stat##*) }
  [[ "${stat%% *}" != Z ]]
}

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

read_pid() { [[ -s "$1" ]] && tr -dc '0-9' <"$1" || true; }

wait_pid_exit() { # wait_pid_exit PID SECONDS: true when PID exited in time
  local pid=$1 deadline=$((SECONDS + $2))
  while pid_alive "$pid"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

SUDO=""
if [[ $EUID -ne 0 ]] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() { # apt_install PKG...: install Debian packages, updating the lists once
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
  if ((APT_UPDATED == 0)); then
    log "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed"
}

acquire_lock() { # serialise concurrent runs on the same state dir
  mkdir -p "$STATE"
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$STATE/.infra.lock"
    flock -w 180 9 || die "another infra.sh is running on $STATE (lock $STATE/.infra.lock)"
  fi
}

# ------------------------------------------------------------------ kafka ---

kafka_external() { [[ -n "${KAFKA_BOOTSTRAP_SERVERS:-}" ]]; }

kafka_pid() { # pid of the broker this script started, if it is still running
  local pid
  pid=$(read_pid "$KAFKA_PID")
  pid_alive "$pid" || return 1
  # Guard against a recycled pid: it must be our java running kafka.Kafka.
  [[ "$(cmdline_of "$pid")" == *"kafka.Kafka $KAFKA_PROPS"* ]] || return 1
  echo "$pid"
}

kafka_ensure_java() {
  command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null 2>&1 || [[ -f "$KAFKA_LIBS_MARKER" ]] || apt_install maven
}

kafka_fetch_libs() { # copy kafka_2.13 and its runtime deps from Maven Central, once
  local want have tmp
  want=$(sha256sum "$KAFKA_POM" | cut -d' ' -f1)
  have=$(cat "$KAFKA_LIBS_MARKER" 2>/dev/null || true)
  [[ "$want" == "$have" ]] && return 0
  log "fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
  mkdir -p "$KAFKA_HOME"
  tmp=$(mktemp -d "$KAFKA_HOME/libs.tmp.XXXXXX")
  if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_POM" dependency:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_HOME/mvn.log" 2>&1; then
    cat "$KAFKA_HOME/mvn.log" >&2
    rm -rf "$tmp"
    die "mvn could not fetch the Kafka jars (output above, also in $KAFKA_HOME/mvn.log)"
  fi
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || { rm -rf "$tmp"; die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"; }
  echo "$want" >"$tmp/.complete"
  rm -rf "$KAFKA_LIBS"
  mv "$tmp" "$KAFKA_LIBS"
  log "Kafka jars cached ($(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars)"
}

kafka_tool() { # run a Kafka command-line class (StorageTool) on the cached classpath
  java -cp "$KAFKA_LIBS/*" \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/log4j2.yaml" -Dkafka.logs.dir="$KAFKA_DIR" \
    -Dkafka.log.file=storage-tool.log "$@"
}

kafka_write_props() {
  mkdir -p "$KAFKA_DATA"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" \
      -e "s|@KAFKA_CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@KAFKA_DATA_DIR@|$KAFKA_DATA|g" \
      "$SCRIPT_DIR/server.properties.template" >"$KAFKA_PROPS"
}

kafka_format() { # format the storage once
  [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
  local cluster_id
  cluster_id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1 | tr -d '[:space:]')
  [[ -n "$cluster_id" ]] || die "kafka.tools.StorageTool random-uuid printed nothing"
  log "formatting Kafka storage in $KAFKA_DATA (cluster id $cluster_id)"
  kafka_tool kafka.tools.StorageTool format -t "$cluster_id" -c "$KAFKA_PROPS" >"$KAFKA_DIR/format.out" 2>&1 \
    || { cat "$KAFKA_DIR/format.out" >&2; die "formatting the Kafka storage failed"; }
}

kafka_fail() { # kafka_fail MESSAGE: print the logs' tails and exit
  if [[ -s "$KAFKA_LOG" ]]; then
    log "---- tail of $KAFKA_LOG ----"
    tail -n 40 "$KAFKA_LOG" >&2 || true
  fi
  if [[ -s "$KAFKA_OUT" ]]; then
    log "---- tail of $KAFKA_OUT ----"
    tail -n 20 "$KAFKA_OUT" >&2 || true
  fi
  die "$1"
}

kafka_up() {
  if kafka_external; then
    log "kafka: using the existing server at $KAFKA_BOOTSTRAP_SERVERS (KAFKA_BOOTSTRAP_SERVERS is set)"
    return 0
  fi
  local pid
  if pid=$(kafka_pid); then
    if port_open 127.0.0.1 "$KAFKA_PORT"; then
      log "kafka: already running (pid $pid) on 127.0.0.1:$KAFKA_PORT"
      return 0
    fi
    log "kafka: process $pid is running but port $KAFKA_PORT is not open yet; waiting"
    kafka_wait_ready "$pid"
    return 0
  fi
  local p
  for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    port_open 127.0.0.1 "$p" && die "port $p is already in use by another process; stop it or set KAFKA_PORT / KAFKA_CONTROLLER_PORT (or KAFKA_BOOTSTRAP_SERVERS to use an existing Kafka)"
  done
  kafka_ensure_java
  kafka_fetch_libs
  kafka_write_props
  # Keep the previous run's logs one generation back; the ready check reads
  # the fresh server.log only.
  [[ -f "$KAFKA_LOG" ]] && mv -f "$KAFKA_LOG" "$KAFKA_LOG.1"
  [[ -f "$KAFKA_OUT" ]] && mv -f "$KAFKA_OUT" "$KAFKA_OUT.1"
  kafka_format
  log "kafka: starting on 127.0.0.1:$KAFKA_PORT (controller 127.0.0.1:$KAFKA_CONTROLLER_PORT), log $KAFKA_LOG"
  local t0=$SECONDS
  # setsid: own session, so a Ctrl-C in the calling terminal does not reach it.
  # shellcheck disable=SC2086
  setsid nohup java $KAFKA_HEAP_OPTS \
    -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 \
    -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$SCRIPT_DIR/log4j2.yaml" -Dkafka.logs.dir="$KAFKA_DIR" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
    >"$KAFKA_OUT" 2>&1 </dev/null 9>&- &
  pid=$!
  echo "$pid" >"$KAFKA_PID"
  kafka_wait_ready "$pid"
  log "kafka: ready in $((SECONDS - t0)) s (pid $pid)"
}

kafka_wait_ready() {
  local pid=$1 deadline=$((SECONDS + KAFKA_START_TIMEOUT))
  while :; do
    if ! pid_alive "$pid"; then
      rm -f "$KAFKA_PID"
      kafka_fail "kafka exited during startup"
    fi
    if port_open 127.0.0.1 "$KAFKA_PORT" && grep -qF "$KAFKA_READY_LINE" "$KAFKA_LOG" 2>/dev/null; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      kafka_fail "kafka not ready after ${KAFKA_START_TIMEOUT} s (pid $pid is left running; 'infra.sh down' stops it)"
    fi
    sleep 0.5
  done
}

kafka_down() {
  if kafka_external; then
    log "kafka: leaving the existing server at $KAFKA_BOOTSTRAP_SERVERS alone (KAFKA_BOOTSTRAP_SERVERS is set)"
    return 0
  fi
  local pid
  if ! pid=$(kafka_pid); then
    rm -f "$KAFKA_PID"
    log "kafka: not running"
    return 0
  fi
  log "kafka: stopping (pid $pid)"
  local t0=$SECONDS
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_exit "$pid" "$KAFKA_STOP_TIMEOUT"; then
    log "kafka: still running after ${KAFKA_STOP_TIMEOUT} s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" 10 || die "kafka (pid $pid) did not exit after SIGKILL"
  fi
  rm -f "$KAFKA_PID"
  log "kafka: stopped in $((SECONDS - t0)) s"
}

kafka_status() {
  if kafka_external; then
    local first=${KAFKA_BOOTSTRAP_SERVERS%%,*}
    first=${first#*://}
    # shellcheck disable=SC2016 # $0/$1 expand in the inner bash
    if timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "${first%:*}" "${first##*:}" 2>/dev/null; then
      echo "kafka: external at $KAFKA_BOOTSTRAP_SERVERS (reachable)"
      return 0
    fi
    echo "kafka: external at $KAFKA_BOOTSTRAP_SERVERS (NOT reachable)"
    return 1
  fi
  local pid
  if pid=$(kafka_pid); then
    if port_open 127.0.0.1 "$KAFKA_PORT"; then
      echo "kafka: running (pid $pid) at 127.0.0.1:$KAFKA_PORT, data $KAFKA_DATA"
      return 0
    fi
    echo "kafka: starting (pid $pid), port $KAFKA_PORT not open yet"
    return 1
  fi
  echo "kafka: stopped"
  return 1
}

# ------------------------------------------------------------------ redis ---

redis_external() { [[ -n "${REDIS_URL:-}" ]]; }

redis_cli() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"; }

redis_pid() { # pid of the redis-server this script started, if it is running
  local pid
  pid=$(read_pid "$REDIS_PID")
  pid_alive "$pid" || return 1
  [[ "$(cmdline_of "$pid")" == *redis-server* ]] || return 1
  echo "$pid"
}

redis_answering() { [[ "$(redis_cli ping 2>/dev/null)" == "PONG" ]]; }

redis_ensure_installed() {
  if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
    apt_install redis-server
    command -v redis-server >/dev/null 2>&1 || die "redis-server still not on PATH after apt-get install"
  fi
}

redis_write_conf() {
  mkdir -p "$REDIS_DIR/data"
  cat >"$REDIS_CONF" <<EOF
# Generated by compose/local/infra.sh on every start.
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize yes
supervised no
pidfile $REDIS_PID
logfile $REDIS_LOG
loglevel notice
dir $REDIS_DIR/data
# Persistence: AOF (fsync every second) plus RDB snapshots.
appendonly yes
appendfsync everysec
appendfilename "appendonly.aof"
dbfilename dump.rdb
save 3600 1 300 100 60 10000
EOF
}

redis_up() {
  if redis_external; then
    log "redis: using the existing server at $REDIS_URL (REDIS_URL is set)"
    return 0
  fi
  redis_ensure_installed
  local pid
  if pid=$(redis_pid); then
    if redis_answering; then
      log "redis: already running (pid $pid) on 127.0.0.1:$REDIS_PORT"
      return 0
    fi
    log "redis: process $pid is running but not answering yet; waiting"
    redis_wait_ready "$pid"
    return 0
  fi
  if port_open 127.0.0.1 "$REDIS_PORT"; then
    die "port $REDIS_PORT is already in use by a server this script did not start; stop it or set REDIS_PORT (or REDIS_URL to use an existing Redis)"
  fi
  redis_write_conf
  log "redis: starting on 127.0.0.1:$REDIS_PORT, data $REDIS_DIR/data, log $REDIS_LOG"
  local t0=$SECONDS
  rm -f "$REDIS_PID"
  redis-server "$REDIS_CONF" >&2 9>&- || { tail -n 20 "$REDIS_LOG" >&2 2>/dev/null || true; die "redis-server failed to start"; }
  redis_wait_ready ""
  log "redis: ready in $((SECONDS - t0)) s (pid $(read_pid "$REDIS_PID"))"
}

redis_wait_ready() {
  local deadline=$((SECONDS + REDIS_START_TIMEOUT))
  until redis_answering; do
    if ((SECONDS >= deadline)); then
      log "---- tail of $REDIS_LOG ----"
      tail -n 20 "$REDIS_LOG" >&2 2>/dev/null || true
      die "redis not answering PING after ${REDIS_START_TIMEOUT} s"
    fi
    sleep 0.2
  done
}

redis_down() {
  if redis_external; then
    log "redis: leaving the existing server at $REDIS_URL alone (REDIS_URL is set)"
    return 0
  fi
  local pid
  if ! pid=$(redis_pid); then
    rm -f "$REDIS_PID"
    log "redis: not running"
    return 0
  fi
  log "redis: stopping (pid $pid)"
  # SHUTDOWN saves an RDB snapshot (save points are configured) and flushes the AOF.
  redis_cli shutdown >/dev/null 2>&1 || true
  if ! wait_pid_exit "$pid" "$REDIS_STOP_TIMEOUT"; then
    log "redis: still running after ${REDIS_STOP_TIMEOUT} s; sending SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_pid_exit "$pid" 10; then
      kill -KILL "$pid" 2>/dev/null || true
      wait_pid_exit "$pid" 5 || die "redis (pid $pid) did not exit"
    fi
  fi
  rm -f "$REDIS_PID"
  log "redis: stopped"
}

redis_status() {
  if redis_external; then
    if command -v redis-cli >/dev/null 2>&1 && [[ "$(timeout 5 redis-cli -u "$REDIS_URL" ping 2>/dev/null)" == "PONG" ]]; then
      echo "redis: external at $REDIS_URL (answering)"
      return 0
    fi
    echo "redis: external at $REDIS_URL (NOT answering)"
    return 1
  fi
  local pid
  if pid=$(redis_pid) && redis_answering; then
    echo "redis: running (pid $pid) at 127.0.0.1:$REDIS_PORT, data $REDIS_DIR/data"
    return 0
  fi
  echo "redis: stopped"
  return 1
}

# --------------------------------------------------------------- commands ---

print_env() { # the addresses to use, on stdout, in KEY=VALUE form
  echo "KAFKA_BOOTSTRAP_SERVERS=${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$KAFKA_PORT}"
  echo "REDIS_URL=${REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"
}

usage() {
  cat >&2 <<EOF
usage: $(basename "$0") COMMAND

  up              start Kafka $KAFKA_VERSION and Redis (no-op for what is already running)
  down            stop both gracefully (no-op when stopped)
  status          show what is running; exit 0 when both are up, 3 otherwise
  restart-kafka   stop and start Kafka, keeping its data
  restart-redis   stop and start Redis, keeping its data
  clean           stop both and delete the state dir ($STATE)
  env             print KAFKA_BOOTSTRAP_SERVERS=... and REDIS_URL=... lines

State: $STATE   Jar cache: $KAFKA_LIBS
EOF
}

cmd=${1:-}
case "$cmd" in
  up)
    acquire_lock
    kafka_up
    redis_up
    print_env
    ;;
  down)
    acquire_lock
    kafka_down
    redis_down
    ;;
  status)
    rc=0
    kafka_status || rc=3
    redis_status || rc=3
    exit "$rc"
    ;;
  restart-kafka)
    kafka_external && die "KAFKA_BOOTSTRAP_SERVERS is set ($KAFKA_BOOTSTRAP_SERVERS): not restarting a server this script does not manage"
    acquire_lock
    kafka_down
    kafka_up
    ;;
  restart-redis)
    redis_external && die "REDIS_URL is set ($REDIS_URL): not restarting a server this script does not manage"
    acquire_lock
    redis_down
    redis_up
    ;;
  clean)
    acquire_lock
    kafka_down
    redis_down
    case "$STATE" in
      "" | / | "$HOME" | "$REPO_ROOT") die "refusing to delete state dir '$STATE'" ;;
    esac
    log "removing $STATE"
    rm -rf "$STATE"
    ;;
  env)
    print_env
    ;;
  -h | --help | help)
    usage
    ;;
  *)
    usage
    exit 2
    ;;
esac
