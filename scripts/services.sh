#!/usr/bin/env bash
# Installs (when missing) and starts the services archsync runs against, without Docker:
#   - two PostgreSQL 15 clusters from Debian's packages (OA on :5433, archive on :5434),
#     wal_level=logical, role `archsync` (LOGIN REPLICATION) owning databases `oa` / `archive`;
#   - Apache Kafka 3.9 in KRaft mode (combined broker+controller) on :9092, assembled by Maven
#     from Maven Central artifacts and run with `java`;
#   - Prometheus from Debian's packages on :9090 (its own config and data under
#     $STATE_DIR/prometheus, not the Debian service), scraping the archsync processes listed in
#     $STATE_DIR/prometheus/targets/*.json and evaluating deploy/prometheus/alerts.yml.
# Usage: scripts/services.sh up|down|status. `up` is idempotent and fails loudly with the log
# tail when a service does not answer.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PG_VERSION=15
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$HERE/kafka/pom.xml")
CACHE_DIR=${ARCHSYNC_CACHE_DIR:-$HOME/.cache/archsync}
STATE_DIR=${ARCHSYNC_STATE_DIR:-$HOME/.local/state/archsync}
KAFKA_LIBS=$CACHE_DIR/kafka-$KAFKA_VERSION/libs
KAFKA_DIR=$STATE_DIR/kafka
KAFKA_PORT=${ARCHSYNC_KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${ARCHSYNC_KAFKA_CONTROLLER_PORT:-9093}
OA_PORT=${ARCHSYNC_OA_PORT:-5433}
ARCHIVE_PORT=${ARCHSYNC_ARCHIVE_PORT:-5434}
PROM_PORT=${ARCHSYNC_PROMETHEUS_PORT:-9090}
PROM_DIR=$STATE_DIR/prometheus
REPO_DIR=$(cd "$HERE/.." && pwd)
PG_USER=archsync
PG_PASSWORD=${ARCHSYNC_PG_PASSWORD:-archsync}

log() { printf '[services] %s\n' "$*" >&2; }
die() { printf '[services] ERROR: %s\n' "$*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ $apt_updated = 0 ]; then as_root apt-get update -qq >/dev/null; apt_updated=1; fi
  log "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq ${APT_OPTS:-} "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_packages() {
  [ -x /usr/lib/postgresql/$PG_VERSION/bin/postgres ] || apt_install postgresql-$PG_VERSION postgresql-client-$PG_VERSION
  command -v pg_createcluster >/dev/null || apt_install postgresql-common
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  command -v mvn >/dev/null || apt_install maven
  command -v prometheus >/dev/null || APT_OPTS=--no-install-recommends apt_install prometheus  # no node exporter
}

# ---------------------------------------------------------------- PostgreSQL
pg_wait_ready() { # name port: until the cluster answers (30 s), else its log tail and die
  local name=$1 port=$2 i
  for i in $(seq 1 60); do
    if as_root runuser -u postgres -- psql -p "$port" -h /var/run/postgresql -d postgres -Atqc 'select 1' >/dev/null 2>&1; then return; fi
    sleep 0.5
  done
  tail -n 30 "/var/log/postgresql/postgresql-$PG_VERSION-$name.log" >&2
  die "PostgreSQL $name does not answer on port $port"
}

pg_cluster_up() { # name port database
  local name=$1 port=$2 db=$3
  if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$PG_VERSION $name"; then
    if port_open "$port"; then
      die "port $port (ARCHSYNC_${name#archsync_}_PORT) is taken by another process; free it or set the port"
    fi
    log "creating PostgreSQL $PG_VERSION cluster $name on port $port"
    as_root pg_createcluster -q "$PG_VERSION" "$name" -p "$port" >/dev/null
  fi
  local conf=/etc/postgresql/$PG_VERSION/$name/conf.d/archsync.conf
  if [ ! -f "$conf" ]; then
    as_root tee "$conf" >/dev/null <<CONF
# written by archsync scripts/services.sh
listen_addresses = '127.0.0.1'
wal_level = logical
max_replication_slots = 40
max_wal_senders = 40
max_connections = 200
wal_sender_timeout = '60s'
track_commit_timestamp = on
max_slot_wal_keep_size = '4GB'
shared_buffers = '256MB'
timezone = 'UTC'
CONF
  fi
  if ! pg_lsclusters -h | awk -v n="$name" '$2==n {print $4}' | grep -q online; then
    if port_open "$port"; then
      die "port $port for cluster $name is taken by another process; free it or set ARCHSYNC_*_PORT"
    fi
    log "starting PostgreSQL cluster $name"
    as_root pg_ctlcluster "$PG_VERSION" "$name" start || {
      tail -n 30 "/var/log/postgresql/postgresql-$PG_VERSION-$name.log" >&2 || true
      die "PostgreSQL cluster $name did not start (log tail above)"
    }
  fi
  pg_wait_ready "$name" "$port"
  as_root runuser -u postgres -- psql -p "$port" -h /var/run/postgresql -d postgres -v ON_ERROR_STOP=1 -qAt >/dev/null <<SQL
SET client_min_messages = warning;
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN REPLICATION CREATEDB PASSWORD '$PG_PASSWORD';
  ELSE
    ALTER ROLE $PG_USER LOGIN REPLICATION CREATEDB PASSWORD '$PG_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $db OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db')
\gexec
GRANT pg_read_all_stats TO $PG_USER;
SQL
  # the archsync role may manage replication origins (its appliers write under them) in its database
  as_root runuser -u postgres -- psql -p "$port" -h /var/run/postgresql -d "$db" -v ON_ERROR_STOP=1 -qAt >/dev/null <<SQL
GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text), pg_replication_origin_drop(text),
  pg_replication_origin_session_setup(text), pg_replication_origin_session_reset(),
  pg_replication_origin_xact_setup(pg_lsn, timestamptz), pg_replication_origin_session_is_setup(),
  pg_replication_origin_advance(text, pg_lsn), pg_replication_origin_progress(text, boolean),
  pg_replication_origin_session_progress(boolean)
  TO $PG_USER;
ALTER DATABASE $db SET timezone TO 'UTC';
SQL
  local wal
  wal=$(as_root runuser -u postgres -- psql -p "$port" -h /var/run/postgresql -d postgres -Atqc 'show wal_level')
  [ "$wal" = logical ] || die "cluster $name runs with wal_level=$wal, archsync needs logical"
  log "PostgreSQL $name ready: postgresql://$PG_USER:***@127.0.0.1:$port/$db (wal_level=$wal)"
}

pg_cluster_down() {
  local name=$1
  if pg_lsclusters -h 2>/dev/null | awk -v n="$name" '$2==n {print $4}' | grep -q online; then
    log "stopping PostgreSQL cluster $name"
    as_root pg_ctlcluster "$PG_VERSION" "$name" stop -m fast
  fi
}

# ---------------------------------------------------------------- Kafka
kafka_fetch() {
  if [ -f "$KAFKA_LIBS/.complete" ]; then return; fi
  log "fetching Apache Kafka $KAFKA_VERSION and its runtime dependencies from Maven Central"
  rm -rf "$KAFKA_LIBS"; mkdir -p "$KAFKA_LIBS"
  mvn -q -B -Dstyle.color=never -f "$HERE/kafka/pom.xml" dependency:copy-dependencies \
      -DoutputDirectory="$KAFKA_LIBS" -DincludeScope=runtime >&2 || die "mvn could not resolve Kafka $KAFKA_VERSION"
  ls "$KAFKA_LIBS"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null || die "kafka_2.13-$KAFKA_VERSION.jar missing after mvn"
  touch "$KAFKA_LIBS/.complete"
}

kafka_pid() { [ -f "$KAFKA_DIR/kafka.pid" ] && cat "$KAFKA_DIR/kafka.pid" || true; }
kafka_alive() { local p; p=$(kafka_pid); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

kafka_up() {
  kafka_fetch
  mkdir -p "$KAFKA_DIR/data"
  if kafka_alive && port_open "$KAFKA_PORT"; then log "Kafka already running (pid $(kafka_pid))"; return; fi
  if port_open "$KAFKA_PORT"; then
    die "port $KAFKA_PORT (ARCHSYNC_KAFKA_BOOTSTRAP) is taken by a process that is not this Kafka; stop it or set ARCHSYNC_KAFKA_PORT"
  fi
  cat > "$KAFKA_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_DIR/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.check.interval.ms=30000
log.cleaner.backoff.ms=1000
message.max.bytes=1048588
PROPS
  cat > "$KAFKA_DIR/log4j.properties" <<'PROPS'
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=INFO
PROPS
  local java_opts=(-Xms256m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true
                   "-Dlog4j.configuration=file:$KAFKA_DIR/log4j.properties")
  if [ ! -f "$KAFKA_DIR/data/meta.properties" ]; then
    local cluster_id
    cluster_id=$(java -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    log "formatting Kafka KRaft storage (cluster $cluster_id)"
    java "${java_opts[@]}" -cp "$KAFKA_LIBS/*" kafka.tools.StorageTool format --ignore-formatted \
      -t "$cluster_id" -c "$KAFKA_DIR/server.properties" >"$KAFKA_DIR/format.log" 2>&1 \
      || { cat "$KAFKA_DIR/format.log" >&2; die "Kafka storage format failed"; }
  fi
  log "starting Apache Kafka $KAFKA_VERSION (KRaft) on 127.0.0.1:$KAFKA_PORT"
  : > "$KAFKA_DIR/kafka.log"
  nohup setsid java "${java_opts[@]}" -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_DIR/server.properties" \
    >>"$KAFKA_DIR/kafka.log" 2>&1 < /dev/null &
  echo $! > "$KAFKA_DIR/kafka.pid"
  local i
  for i in $(seq 1 120); do
    if ! kafka_alive; then tail -n 40 "$KAFKA_DIR/kafka.log" >&2; die "Kafka exited during start (log tail above)"; fi
    if grep -q "Kafka Server started" "$KAFKA_DIR/kafka.log" && port_open "$KAFKA_PORT"; then
      log "Kafka ready on 127.0.0.1:$KAFKA_PORT (pid $(kafka_pid))"; return
    fi
    sleep 0.5
  done
  tail -n 40 "$KAFKA_DIR/kafka.log" >&2
  die "Kafka did not answer on 127.0.0.1:$KAFKA_PORT within 60 s (log tail above)"
}

kafka_down() {
  if kafka_alive; then
    local p; p=$(kafka_pid)
    log "stopping Kafka (pid $p)"
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$KAFKA_DIR/kafka.pid"
}

# ---------------------------------------------------------------- Prometheus
prom_pid() { [ -f "$PROM_DIR/prometheus.pid" ] && cat "$PROM_DIR/prometheus.pid" || true; }
prom_alive() { local p; p=$(prom_pid); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

prometheus_up() {
  mkdir -p "$PROM_DIR/targets" "$PROM_DIR/data"
  # the archsync processes to scrape: edit this file (or add more *.json files) to change ports;
  # defaults: capture --source oa on 9401, capture --source archive on 9402, worker on 9403
  # (`archsync demo --metrics-port 9401` serves its captures on 9401 and its worker on 9403).
  # Target labels must not reuse metric label names (source, target…): Prometheus would rename them.
  [ -f "$PROM_DIR/targets/local.json" ] || cat > "$PROM_DIR/targets/local.json" <<'JSON'
[
  {"targets": ["127.0.0.1:9401", "127.0.0.1:9402"], "labels": {"component": "capture"}},
  {"targets": ["127.0.0.1:9403"], "labels": {"component": "worker"}}
]
JSON
  cat > "$PROM_DIR/prometheus.yml" <<YAML
# written by archsync scripts/services.sh
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
  - $REPO_DIR/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: archsync
    file_sd_configs:
      - files: ['$PROM_DIR/targets/*.json']
        refresh_interval: 5s
  - job_name: prometheus
    static_configs:
      - targets: ['127.0.0.1:$PROM_PORT']
YAML
  promtool check config "$PROM_DIR/prometheus.yml" >"$PROM_DIR/check.log" 2>&1 \
    || { cat "$PROM_DIR/check.log" >&2; die "Prometheus configuration or alert rules do not load"; }
  if prom_alive && port_open "$PROM_PORT"; then
    kill -HUP "$(prom_pid)"  # reload the configuration and the alert rules
    log "Prometheus already running (pid $(prom_pid)), configuration reloaded"; return
  fi
  port_open "$PROM_PORT" && die "port $PROM_PORT is taken by a process that is not this Prometheus; set ARCHSYNC_PROMETHEUS_PORT"
  log "starting Prometheus on 127.0.0.1:$PROM_PORT"
  nohup setsid prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --storage.tsdb.retention.time=2d --web.listen-address="127.0.0.1:$PROM_PORT" --web.enable-lifecycle \
    >>"$PROM_DIR/prometheus.log" 2>&1 </dev/null &
  echo $! > "$PROM_DIR/prometheus.pid"
  local i
  for i in $(seq 1 60); do
    prom_alive || { tail -n 30 "$PROM_DIR/prometheus.log" >&2; die "Prometheus exited during start (log tail above)"; }
    if curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null 2>&1; then
      log "Prometheus ready on http://127.0.0.1:$PROM_PORT (pid $(prom_pid))"; return
    fi
    sleep 0.5
  done
  tail -n 30 "$PROM_DIR/prometheus.log" >&2
  die "Prometheus did not answer on 127.0.0.1:$PROM_PORT within 30 s (log tail above)"
}

prometheus_down() {
  if prom_alive; then
    local p; p=$(prom_pid)
    log "stopping Prometheus (pid $p)"
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$p" 2>/dev/null || true
  fi
  rm -f "$PROM_DIR/prometheus.pid"
}

case "${1:-up}" in
  up) # up [postgres|kafka|prometheus]: all by default
    ensure_packages
    if [ "${2:-all}" = all ] || [ "${2:-all}" = postgres ]; then
      pg_cluster_up archsync_oa "$OA_PORT" oa
      pg_cluster_up archsync_archive "$ARCHIVE_PORT" archive
    fi
    if [ "${2:-all}" = all ] || [ "${2:-all}" = kafka ]; then kafka_up; fi
    if [ "${2:-all}" = all ] || [ "${2:-all}" = prometheus ]; then prometheus_up; fi
    ;;
  down)
    prometheus_down
    kafka_down
    pg_cluster_down archsync_oa
    pg_cluster_down archsync_archive
    ;;
  reset) # down, then forget all data (clusters and Kafka log dirs)
    "$0" down
    for c in archsync_oa archsync_archive; do
      pg_lsclusters -h | awk '{print $2}' | grep -qx $c && as_root pg_dropcluster "$PG_VERSION" $c || true
    done
    rm -rf "$KAFKA_DIR" "$PROM_DIR/data"
    ;;
  restart-db) # restart-db oa|archive: a fast restart of one database (what a failover or an
    # operator's restart looks like to archsync; the integration tests use it)
    case "${2:-}" in oa|archive) ;; *) die "usage: $0 restart-db oa|archive" ;; esac
    log "restarting PostgreSQL cluster archsync_$2"
    as_root pg_ctlcluster "$PG_VERSION" "archsync_$2" restart -m fast
    port=$OA_PORT; [ "$2" = archive ] && port=$ARCHIVE_PORT
    pg_wait_ready "archsync_$2" "$port"
    ;;
  status)
    pg_lsclusters | grep -E 'archsync_|Ver' || true
    if kafka_alive; then echo "kafka running pid $(kafka_pid) port $KAFKA_PORT"; else echo "kafka down"; fi
    if prom_alive; then echo "prometheus running pid $(prom_pid) port $PROM_PORT"; else echo "prometheus down"; fi
    ;;
  *) die "usage: $0 up|down|reset|status|restart-db oa|archive" ;;
esac
