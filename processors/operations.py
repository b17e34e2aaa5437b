"""The worker's operations hooks: held flows, notifications, release markers, schedules.

``create_app`` builds one :class:`WorkerOperations`; the transform agent asks it where a command
goes (:meth:`WorkerOperations.topic_for`: the held topic of a scheduled/triggered flow, else the
apply topic) and hands it each transform result (:meth:`WorkerOperations.after_transform`:
notifications to ``<prefix>.notifications``, release markers to ``<prefix>.control``).

It also registers, on the Faust app:
  agent ``control``   release markers → :func:`processors.sync_modes.release_held`
  a 1 s timer (leader only) that opens the windows of scheduled flows, runs the notification
  scanner on ``notifications.scan_schedule`` and the reconciliation on ``reconcile.schedule``.
Blocking work (Kafka copy, database scans) runs in a small thread pool, one run per job at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import faust
import orjson

from archsync import metrics
from archsync.settings import Settings
from processors.notifications import notification_message, notifications_topic
from processors.sync_modes import (
    WindowScheduler,
    control_topic,
    held_flows,
    held_topic,
    next_fire,
    release_held,
    release_marker,
)
from topology.model import Topology

log = logging.getLogger(__name__)


class CronTicker:
    """True once per cron fire time passed (local time); never at start."""

    def __init__(self, cron: str, now: datetime | None = None) -> None:
        self.cron = cron
        self.due = next_fire(cron, now)

    def tick(self, now: datetime | None = None) -> bool:
        now = now if now is not None and now.tzinfo is not None else (now or datetime.now()).astimezone()
        if now < self.due:
            return False
        self.due = next_fire(self.cron, now)
        return True


class WorkerOperations:
    """Topics, agents and timers of the operations features in one worker."""

    def __init__(
        self, app: faust.App, topology: Topology, settings: Settings, raw_topic: Callable[..., faust.TopicT]
    ) -> None:
        self.topology = topology
        self.settings = settings
        prefix = topology.topics.prefix
        partitions = topology.topics.partitions
        self.held = {f.name: raw_topic(held_topic(prefix, f.name), partitions=partitions) for f in held_flows(topology)}
        self.notifications = raw_topic(notifications_topic(prefix), partitions=partitions)
        self.control = raw_topic(control_topic(prefix), partitions=partitions)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="operations")
        self.running: set[str] = set()
        self.windows = {
            f.name: WindowScheduler(f.sync.window, f.sync.window_minutes)
            for f in held_flows(topology)
            if f.sync.mode == "scheduled" and f.sync.window
        }
        ops = topology.operations
        self.scan_ticker = CronTicker(ops.scan_schedule) if ops and ops.scan_schedule and ops.scans else None
        self.reconcile_ticker = CronTicker(ops.reconcile_schedule) if ops and ops.reconcile_schedule else None
        app.agent(self.control, name="control")(self._control_agent)
        app.timer(1.0, on_leader=True)(self._tick)

    # -- transform agent hooks ------------------------------------------------------------
    def topic_for(self, cmd: Any, apply_topics: Mapping[str, Any]) -> Any:
        """The topic a command goes to: its flow's held topic, else its target's apply topic."""
        held = self.held.get(cmd.flow)
        if held is None:
            return apply_topics[cmd.target_system]
        metrics.HELD_COMMANDS.labels(cmd.flow).inc()
        return held

    async def after_transform(self, result: Any) -> None:
        """Send a transform result's notifications and release markers."""
        for record in result.notifications:
            metrics.NOTIFICATIONS.labels(record["kind"]).inc()
            key, value = notification_message(record)
            await self.notifications.send(key=key, value=value)
        for flow in result.releases:
            await self.control.send(key=flow.encode(), value=release_marker(flow, "rule"))

    # -- background jobs ------------------------------------------------------------------
    def _start(self, job: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> None:
        """Run ``fn`` in the pool unless ``job`` is still running (errors are logged)."""
        if job in self.running:
            return
        self.running.add(job)
        loop = asyncio.get_running_loop()

        def run() -> Any:
            try:
                return fn(*args, **kw)
            except Exception:
                log.exception("operations job %s failed", job)
                return None
            finally:
                self.running.discard(job)

        loop.run_in_executor(self.executor, run)

    def release(self, flow: str, until: datetime | None = None) -> None:
        self._start(f"release:{flow}", release_held, self.topology, self.settings, flow, until=until)

    async def _control_agent(self, stream: faust.StreamT) -> None:
        async for value in stream:
            try:
                marker = orjson.loads(value)
            except orjson.JSONDecodeError:
                log.warning("control: not a JSON marker: %r", value[:200])
                continue
            if marker.get("action") == "release" and marker.get("flow") in self.held:
                log.info("release marker", extra={"flow": marker["flow"], "by": marker.get("by")})
                self.release(marker["flow"])

    async def _tick(self) -> None:
        now = datetime.now().astimezone()
        for flow, window in self.windows.items():
            due, until = window.tick(now)
            if due:
                self.release(flow, until)
        if self.scan_ticker is not None and self.scan_ticker.tick(now):
            from processors.scanner import scan_notifications

            self._start("scan", scan_notifications, self.topology, self.settings)
        if self.reconcile_ticker is not None and self.reconcile_ticker.tick(now):
            from processors.reconcile import reconcile

            ops = self.topology.operations
            self._start("reconcile", reconcile, self.topology, self.settings, repair=bool(ops and ops.reconcile_repair))
