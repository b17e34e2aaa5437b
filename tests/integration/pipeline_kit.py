"""The whole pipeline on the real services: both captures, a worker process, per-test names."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka.admin import AdminClient

from archsync.settings import Settings
from connectors.capture import CaptureService
from connectors.catalog import drop_slot, forget_snapshots
from connectors.kafka_admin import delete_topics
from connectors.postgres import connect
from topology.model import Topology, parse_topology

REPO = Path(__file__).resolve().parents[2]


def topology_yaml_for_test(unique: str, base: Path | None = None) -> str:
    """The reference topology (or ``base``) with this test's own prefix, slots and publications."""
    data = yaml.safe_load((base or REPO / "topology" / "reference.yaml").read_text())
    data["name"] = f"test{unique}"
    data.setdefault("topics", {})["prefix"] = f"p{unique}"
    data["topics"]["partitions"] = 2
    for name, source in data["sources"].items():
        source["slot"] = f"{name}_{unique}"
        source["publication"] = f"{name}_{unique}"
        source["heartbeat_seconds"] = 2
        source["snapshot"] = "never"  # start from now: rows of earlier runs are not re-emitted
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def worker_children(pid: int) -> list[int]:
    """A process's children (the worker's applier processes), from /proc."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


class Pipeline:
    """Captures in threads of the test process, the worker as a child process (so it can be killed)."""

    def __init__(
        self, settings: Settings, unique: str, tmp_path: Path, base: Path | None = None, metrics_port: int = 0
    ) -> None:
        self.settings = settings
        self.metrics_port = metrics_port  # the worker's /metrics (0: not served)
        self.unique = unique
        self.text = topology_yaml_for_test(unique, base)
        self.file = tmp_path / "topology.yaml"
        self.file.write_text(self.text)
        self.topology: Topology = parse_topology(self.text, str(self.file))
        self.log = tmp_path / "worker.log"
        self.captures = {name: CaptureService(self.topology, name, settings) for name in self.topology.sources}
        self.threads: list[threading.Thread] = []
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_role = "all"  # "pipeline" with a separate audit worker (start_audit_worker)
        self.audit_worker: subprocess.Popen[bytes] | None = None
        self.extra_workers: list[subprocess.Popen[bytes]] = []
        self._sessions: dict[str, Any] = {}  # system → connection (session())
        self.env = {
            **os.environ,
            "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ.get('PATH', '')}",
            # this tree's code, also in a git worktree sharing another tree's virtualenv (benchmarks A/B)
            "PYTHONPATH": os.pathsep.join(
                [str(REPO), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO))]
            ),
        }

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Pipeline:
        for svc in self.captures.values():
            th = threading.Thread(target=svc.run_forever, daemon=True)
            th.start()
            self.threads.append(th)
        deadline = time.monotonic() + 60
        while not all(s.stats.streaming for s in self.captures.values()):
            assert time.monotonic() < deadline, "captures did not start streaming"
            time.sleep(0.1)
        self.start_worker()
        return self

    def start_worker(self, *, extra: bool = False) -> None:
        """The worker (or, with ``extra``, one more worker in the same group: they share the partitions)."""
        handle = self.log.open("ab")
        proc = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "archsync"),
                *("--topology", str(self.file), "worker", "--loglevel", "info", "--role", self.worker_role),
                *(("--metrics-port", str(self.metrics_port)) if self.metrics_port and not extra else ()),
            ],
            stdout=handle,
            stderr=handle,
            env=self.env,
        )
        if extra:
            self.extra_workers.append(proc)
        else:
            self.worker = proc

    def start_audit_worker(self) -> None:
        """The audit agent in its own process (with ``worker_role = "pipeline"`` for the other)."""
        handle = (self.log.parent / "audit-worker.log").open("ab")
        self.audit_worker = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "archsync"),
                *("--topology", str(self.file), "worker", "--loglevel", "info", "--role", "audit"),
            ],
            stdout=handle,
            stderr=handle,
            env=self.env,
        )

    def kill_worker(self) -> None:
        """SIGKILL the worker; its applier processes must not outlive it (they would hold the
        replication origins)."""
        assert self.worker is not None
        children = worker_children(self.worker.pid)
        self.worker.send_signal(signal.SIGKILL)
        self.worker.wait(30)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{c}").exists() for c in children):
            assert time.monotonic() < deadline, f"processes of the killed worker still alive: {children}"
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in (self.worker, self.audit_worker, *self.extra_workers):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for svc in self.captures.values():
            svc.stop()
        for th in self.threads:
            th.join(30)
        for conn in self._sessions.values():
            conn.close()
        self._sessions.clear()

    def cleanup(self) -> None:
        self.stop()
        for source in self.topology.sources.values():
            with connect(source.dsn(self.settings), source.dsn_env, autocommit=True) as conn:
                for _ in range(50):
                    try:
                        drop_slot(conn, source.slot, terminate=True)
                        break
                    except Exception:  # noqa: BLE001 - walsender still exiting
                        time.sleep(0.2)
                forget_snapshots(conn, source.slot)
                conn.execute(f"DROP PUBLICATION IF EXISTS {source.publication}")
        if os.environ.get("ARCHSYNC_TEST_KEEP_TOPICS"):  # to look into a failed run
            return
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
        topics = [
            t
            for t in admin.list_topics(timeout=10).topics
            if t.startswith((f"p{self.unique}.", f"archsync-test{self.unique}"))
        ]
        delete_topics(self.settings.kafka_bootstrap, topics)

    # -- helpers ------------------------------------------------------------------------
    def sql(self, system: str, statement: str, params: Any = None) -> list[Any]:
        """One statement on a connection of its own."""
        source = self.topology.source(system)
        with connect(source.dsn(self.settings), source.dsn_env, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def session(self, system: str) -> Any:
        """A connection to ``system`` kept open until the pipeline stops (autocommit; for one thread),
        for a writer that keeps writing, as an application with a connection pool would. A new
        connection per statement costs the database a backend start each: at 20 a second (the
        pipeline benchmark's writer at 500 row changes/s) that was ~0.3 of a core of this 2-core
        machine, taken from the pipeline it measured."""
        conn = self._sessions.get(system)
        if conn is None or conn.closed:
            source = self.topology.source(system)
            conn = self._sessions[system] = connect(source.dsn(self.settings), source.dsn_env, autocommit=True)
        return conn

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.worker is not None and self.worker.poll() is not None:
                raise AssertionError(f"worker exited: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; worker log tail:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
