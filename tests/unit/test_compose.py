"""Structural checks of docker-compose.yml and the monitoring configuration, without Docker.

No compose JSON schema is available offline, so these are hand-written checks of the parts of
the Compose specification the file uses, plus the project's own wiring (ports, listeners,
DSNs, scrape targets, mounted paths).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_DASHBOARDS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "archsync.yml"

TOP_LEVEL_KEYS = {"version", "name", "services", "networks", "volumes", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "build",
    "image",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "expose",
    "volumes",
    "depends_on",
    "healthcheck",
    "restart",
    "hostname",
    "container_name",
    "networks",
    "labels",
    "user",
    "working_dir",
    "profiles",
    "deploy",
    "ulimits",
    "logging",
    "stop_grace_period",
    "stop_signal",
    "tmpfs",
    "shm_size",
    "extra_hosts",
    "cap_add",
    "cap_drop",
    "init",
    "read_only",
    "configs",
    "secrets",
    "platform",
    "pull_policy",
    "tty",
    "stdin_open",
    "mem_limit",
    "cpus",
}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
PORT_RE = re.compile(r"^(?:\d{1,3}(?:\.\d{1,3}){3}:)?(\d{1,5}):(\d{1,5})(?:/(?:tcp|udp))?$")
DURATION_RE = re.compile(r"^(\d+(ms|s|m|h))+$")
ARCHSYNC_SERVICES = {"archsync-init", "capture-oa", "capture-archive", "worker", "audit-worker"}
PLACEHOLDER_RE = re.compile(r"TODO|FIXME|XXX|CHANGEME|<[a-z_ -]+>", re.IGNORECASE)


def _load(path: Path) -> Any:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs = compose.get("services")
    assert isinstance(svcs, dict) and svcs, "compose file defines no services"
    return svcs


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {k: v for k, v in pairs}
    assert isinstance(env, dict)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command_text(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    assert isinstance(deps, dict)
    return deps


def test_top_level_keys_are_compose_keys(compose: dict[str, Any]) -> None:
    unknown = {k for k in compose if k not in TOP_LEVEL_KEYS and not str(k).startswith("x-")}
    assert not unknown, f"unknown top-level keys: {sorted(unknown)}"
    assert "version" not in compose, "the 'version' key is obsolete in the Compose specification"


def test_expected_services_present(services: dict[str, dict[str, Any]]) -> None:
    expected = {"kafka", "oa-db", "archive-db", "prometheus", "grafana"} | ARCHSYNC_SERVICES
    assert expected <= set(services), f"missing services: {sorted(expected - set(services))}"


def test_services_have_known_keys_and_an_image_or_build(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        assert isinstance(svc, dict), name
        unknown = set(svc) - SERVICE_KEYS
        assert not unknown, f"{name}: unknown service keys {sorted(unknown)}"
        assert svc.get("image") or svc.get("build"), f"{name}: needs an image or a build"


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "build" in svc:
            continue
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


def test_build_context_has_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        path = ROOT / context / dockerfile
        assert path.is_file(), f"{name}: {path.relative_to(ROOT)} is missing"
        text = path.read_text(encoding="utf-8")
        assert re.search(r"^FROM\s+python:3\.11-slim\b", text, re.MULTILINE), path
        assert re.search(r"pip install\s+(--\S+\s+)*\.", text), f"{path}: must pip install ."


def test_depends_on_names_existing_services(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for dep, spec in _depends_on(svc).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name, f"{name} depends on itself"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in DEPENDS_CONDITIONS, f"{name} -> {dep}: bad condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, no healthcheck"


def test_depends_on_has_no_cycle(services: dict[str, dict[str, Any]]) -> None:
    state: dict[str, int] = {}

    def visit(node: str, path: tuple[str, ...]) -> None:
        if state.get(node) == 2:
            return
        assert state.get(node) != 1, f"dependency cycle: {' -> '.join((*path, node))}"
        state[node] = 1
        for dep in _depends_on(services[node]):
            visit(dep, (*path, node))
        state[node] = 2

    for name in services:
        visit(name, ())


def test_ports_are_host_container_strings(services: dict[str, dict[str, Any]]) -> None:
    host_ports: dict[int, str] = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert isinstance(port, str), f"{name}: quote port mappings ({port!r}); YAML reads 1:1 oddly"
            match = PORT_RE.match(port)
            assert match, f"{name}: port {port!r} is not host:container"
            host = int(match.group(1))
            assert host not in host_ports, f"host port {host} used by {host_ports[host]} and {name}"
            host_ports[host] = name
    assert host_ports.get(9092) == "kafka"
    assert host_ports.get(5433) == "oa-db"
    assert host_ports.get(5434) == "archive-db"
    assert host_ports.get(9090) == "prometheus"
    assert host_ports.get(3000) == "grafana"


def test_restart_and_healthchecks_well_formed(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        if "restart" in svc:
            # An unquoted `no` is the boolean False in YAML 1.1.
            assert svc["restart"] in RESTART_POLICIES or str(svc["restart"]).startswith("on-failure:"), name
        check = svc.get("healthcheck")
        if not check or check.get("disable"):
            continue
        test = check["test"]
        assert isinstance(test, str) or (isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL", "NONE"}), name
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                assert DURATION_RE.match(str(check[key])), f"{name}: healthcheck {key}={check[key]!r}"
    assert services["archsync-init"]["restart"] == "no"


def test_environment_values_are_scalars(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        env = svc.get("environment") or {}
        items = env.values() if isinstance(env, dict) else env
        for value in items:
            assert value is None or isinstance(value, str | int | float | bool), f"{name}: {value!r}"


def test_bind_mounts_exist_and_named_volumes_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            if isinstance(volume, dict):
                source, kind = volume.get("source", ""), volume.get("type", "volume")
            else:
                source = volume.split(":", 1)[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind":
                assert source.startswith("./"), f"{name}: bind mount {source!r} should be repo-relative"
                assert (ROOT / source).exists(), f"{name}: bind-mounted {source} does not exist"
            else:
                assert source in declared, f"{name}: named volume {source!r} not declared at top level"


def test_postgres_services_use_logical_wal(services: dict[str, dict[str, Any]]) -> None:
    pg = {name: svc for name, svc in services.items() if str(svc.get("image", "")).startswith("postgres:")}
    assert set(pg) == {"oa-db", "archive-db"}
    for name, svc in pg.items():
        assert svc["image"] == "postgres:15", name
        command = _command_text(svc)
        assert "wal_level=logical" in command, f"{name}: logical decoding needs wal_level=logical"
        assert "max_replication_slots=" in command and "max_wal_senders=" in command, name
        env = _environment(svc)
        assert env["POSTGRES_USER"] == "archsync" and env["POSTGRES_PASSWORD"] == "archsync", name
        assert "pg_isready" in str(svc["healthcheck"]["test"]), name
    assert _environment(services["oa-db"])["POSTGRES_DB"] == "oa"
    assert _environment(services["archive-db"])["POSTGRES_DB"] == "archive"


def test_kafka_runs_in_kraft_mode(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.1"
    env = _environment(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any(key.startswith("KAFKA_ZOOKEEPER") for key in env), "KRaft mode has no ZooKeeper"
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert any(v.startswith(f"{node_id}@") for v in voters), "the node must be one of the voters"
    controller_names = set(env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(","))

    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    protocols = dict(item.split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert controller_names <= set(listeners), "controller listener must be declared"
    assert set(listeners) <= set(protocols), "every listener needs a security protocol"
    assert set(advertised) <= set(listeners) - controller_names
    assert env.get("KAFKA_INTER_BROKER_LISTENER_NAME", "PLAINTEXT") in advertised
    advertised_addresses = set(advertised.values())
    assert "localhost:9092" in advertised_addresses, "host clients connect on localhost:9092"
    internal = _environment(services["worker"])["ARCHSYNC_KAFKA_BOOTSTRAP"]
    assert internal in advertised_addresses, f"containers use {internal}, which Kafka must advertise"

    for key, value in env.items():
        if key.endswith("REPLICATION_FACTOR") or key.endswith("MIN_ISR"):
            assert value == "1", f"single node: {key} must be 1"


def test_archsync_processes_wired(services: dict[str, dict[str, Any]]) -> None:
    commands = {
        "archsync-init": ["archsync db init", "archsync topology apply"],
        "capture-oa": ["archsync capture --source oa"],
        "capture-archive": ["archsync capture --source archive"],
        "worker": ["archsync worker"],
    }
    for name, expected in commands.items():
        svc = services[name]
        assert "build" in svc, f"{name} is built from the repository Dockerfile"
        text = _command_text(svc)
        position = 0
        for part in expected:
            found = text.find(part, position)
            assert found >= 0, f"{name}: command {text!r} lacks {part!r} (in order)"
            position = found + len(part)

        env = _environment(svc)
        assert env["ARCHSYNC_METRICS_PORT"] == "9400"
        for setting, db in (("ARCHSYNC_OA_DSN", "oa"), ("ARCHSYNC_ARCHIVE_DSN", "archive")):
            dsn = urlsplit(env[setting])
            assert dsn.scheme == "postgresql" and dsn.path == f"/{db}", f"{name}: {setting}"
            assert dsn.hostname in services and dsn.port == 5432, f"{name}: {setting} host/port"
        host, _, port = env["ARCHSYNC_KAFKA_BOOTSTRAP"].rpartition(":")
        assert host == "kafka" and port == "19092", name

        deps = _depends_on(svc)
        for infra in ("kafka", "oa-db", "archive-db"):
            assert deps.get(infra, {}).get("condition") == "service_healthy", f"{name} -> {infra}"
        if name != "archsync-init":
            assert deps["archsync-init"]["condition"] == "service_completed_successfully", name


def test_monitoring_mounts(services: dict[str, dict[str, Any]]) -> None:
    prom_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    assert prom_mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert prom_mounts["/etc/prometheus/alerts.yml"] == "./deploy/prometheus/alerts.yml"
    graf_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert graf_mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert graf_mounts["/var/lib/grafana/dashboards"] == "./deploy/grafana/dashboards"


def test_prometheus_config(services: dict[str, dict[str, Any]]) -> None:
    config = _load(PROMETHEUS_FILE)
    # resolved next to prometheus.yml; docker-compose mounts both in /etc/prometheus
    assert "alerts.yml" in config["rule_files"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for sc in jobs["archsync"]["static_configs"] for t in sc["targets"]}
    long_running = ARCHSYNC_SERVICES - {"archsync-init"}
    assert targets == {f"{name}:9400" for name in long_running}
    for target in targets:
        assert target.split(":")[0] in services


def test_alert_rules() -> None:
    text = ALERTS_FILE.read_text(encoding="utf-8")
    assert not PLACEHOLDER_RE.search(text), "alerts.yml contains a placeholder"
    config = yaml.safe_load(text)
    groups = config["groups"]
    assert isinstance(groups, list) and groups
    by_name = {g["name"]: g for g in groups}
    assert {"archsync", "archsync-recording"} <= set(by_name)
    assert all("record" in r for r in by_name["archsync-recording"]["rules"])
    names = set()
    for group in groups:
        assert group["rules"], group["name"]
        if group["name"] == "archsync-recording":
            continue
        for rule in group["rules"]:
            assert isinstance(rule.get("alert"), str) and rule["alert"], rule
            assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), rule
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            if "for" in rule:
                assert DURATION_RE.match(str(rule["for"])), rule
            names.add(rule["alert"])
    assert {"ArchsyncCaptureDown", "ArchsyncSlotLagHigh", "ArchsyncDeadLettersPresent"} <= names
    rules = {rule["alert"]: rule for rule in by_name["archsync"]["rules"]}
    assert 'up{job="archsync", component="capture"} == 0' in rules["ArchsyncCaptureDown"]["expr"]
    assert "archsync_slot_lag_bytes" in rules["ArchsyncSlotLagHigh"]["expr"]
    assert "archsync_dlq_messages" in rules["ArchsyncDeadLettersPresent"]["expr"]


def test_grafana_provisioning(services: dict[str, dict[str, Any]]) -> None:
    datasources = _load(GRAFANA_DATASOURCES)
    assert datasources["apiVersion"] == 1
    (prom,) = [ds for ds in datasources["datasources"] if ds["type"] == "prometheus"]
    assert urlsplit(prom["url"]).hostname == "prometheus" and "prometheus" in services

    dashboards = _load(GRAFANA_DASHBOARDS)
    assert dashboards["apiVersion"] == 1
    (provider,) = dashboards["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
