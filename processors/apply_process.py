"""The applier of one target system, in a process of its own or in a thread of the worker.

The worker's event loop (consume, transform, produce) and an applier (build SQL, convert values,
wait for PostgreSQL) are both Python: in one process they take turns on the GIL, and every
database round trip of the applier waits for the event loop's turn to end. Measured with the
pipeline benchmark: the archive applier, 1.3 ms per command alone, took 3–4 ms per command
inside the worker, and was what bounded the pipeline. In a process of its own (``spawn``, one per
target system) it runs on the other core.

:class:`ApplyRunner` hides which: ``await runner.apply(values)`` applies one batch of encoded
commands and returns the :class:`~connectors.applier.ApplyResult` and the replication origin the
applier writes under. ``ARCHSYNC_APPLY_PROCESS=0`` keeps the applier in a thread (tests that
inject an applier class use that too).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import sys
import threading
import time
import types
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import psycopg
import yaml

from archsync import metrics
from archsync.errors import ConfigError
from archsync.settings import Settings
from connectors.postgres import first_line
from processors.model import ApplyCommand
from topology.model import Topology, parse_topology

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def applier_origin(topology: Topology, system: str) -> str:
    """The replication origin of the applier writing to ``system``: the topology's applier named
    ``…_<system>`` (the capture skips transactions under it and its numbered siblings)."""
    for name in topology.appliers:
        if name.endswith(f"_{system}"):
            return name
    return f"archsync_apply_{system}"


def open_applier(topology: Topology, settings: Settings, system: str, applier_cls: Any = None) -> Any:
    """An applier for ``system`` under the first free replication origin.

    PostgreSQL lets one session at a time use a replication origin: a second worker takes the next
    numbered origin (``archsync_apply_<system>_2`` …), which the capture also skips."""
    if applier_cls is None:
        from connectors.applier import Applier

        applier_cls = Applier
    base = applier_origin(topology, system)
    last_error: Exception | None = None
    for n in range(1, 17):
        origin = base if n == 1 else f"{base}_{n}"
        try:
            return applier_cls.for_topology(topology, settings, system, origin)
        except Exception as exc:
            last_error = exc
            if "is already active" not in str(exc) and "in use" not in str(exc):
                raise
    raise RuntimeError(f"no free replication origin for the {system} applier: {last_error}")


# -- the applier process ----------------------------------------------------------------------
_child: dict[str, Any] = {}


class _PlainSpawnProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that does not re-run the parent's main module.

    ``spawn`` imports the parent's ``__main__`` in the child (for functions defined there); ours is
    the ``archsync`` command, whose CLI imports ~6 MiB the applier never uses. The child needs only
    this module, which it imports by name for its initializer."""

    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")  # no __file__, no __spec__: nothing to re-run
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            sys.modules["__main__"] = main


class _PlainSpawnContext(multiprocessing.context.SpawnContext):
    Process = _PlainSpawnProcess


def _watch_parent(parent: int) -> None:
    """Exit when the worker is gone (a SIGKILLed worker must not leave its origin taken)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _child_init(worker: int, topology_yaml: str, path: str, settings: Settings, system: str) -> None:
    # die with the worker: Linux's parent-death signal, and a watcher for what it misses (a worker
    # killed while we were still starting; the signal also follows the starting thread's exit)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(worker,), name="watch-worker", daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker stops us (Ctrl-C goes to the group)
    _child.update(topology=parse_topology(topology_yaml, path), settings=settings, system=system)


def _child_applier() -> Any:
    applier = _child.get("applier")
    if applier is None:
        applier = _child["applier"] = open_applier(_child["topology"], _child["settings"], _child["system"])
    return applier


def _child_open() -> str:
    return str(_child_applier().origin)


def _child_apply(values: list[bytes]) -> tuple[Any, str]:
    applier = _child_applier()
    try:
        return applier.apply_batch([ApplyCommand.from_json(v) for v in values]), applier.origin
    except Exception:
        if _forget_if_broken(applier):
            _child.pop("applier", None)
        raise


def _forget_if_broken(applier: Any) -> bool:
    """Close an applier whose connection is lost (True): the next batch opens a new one."""
    conn = getattr(applier, "conn", None)
    if conn is None or not (conn.closed or conn.broken):
        return False
    with contextlib.suppress(Exception):
        applier.close()
    with contextlib.suppress(Exception):
        conn.close()
    return True


def passing_failure(exc: BaseException) -> bool:
    """A failure to apply a batch that passes, so the batch is tried again rather than given up:
    the connection lost or the database unreachable (``OperationalError``, ``InterfaceError``, a
    ``ConfigError`` from reconnecting), the transaction refused as a whole (deadlock, serialization
    failure, lock timeout, admin shutdown: all ``OperationalError``), the replication origin still
    held by the lost session (``ApplyError``), or the applier process gone (``BrokenProcessPool``).
    A command the target refuses is not one: the applier isolates it and it is dead-lettered."""
    from connectors.applier import ApplyError

    return isinstance(
        exc, (psycopg.OperationalError, psycopg.InterfaceError, ConfigError, ApplyError, BrokenProcessPool, OSError)
    )


def retry_delay(failures: int, first: float = 0.5, longest: float = 30.0) -> float:
    """Seconds to wait after ``failures`` failed attempts before the next: doubling, capped."""
    return min(longest, first * 2 ** min(failures, 16))


class ApplyRunner:
    """Applies batches of encoded commands for one target system (see the module's doc)."""

    def __init__(
        self,
        topology: Topology,
        settings: Settings,
        system: str,
        *,
        applier_cls: Any = None,
        in_process: bool | None = None,
    ) -> None:
        self.topology = topology
        self.settings = settings
        self.system = system
        self.applier_cls = applier_cls
        if in_process is None:
            in_process = applier_cls is None and os.environ.get("ARCHSYNC_APPLY_PROCESS", "1") != "0"
        self.in_process = in_process
        self._executor: Executor | None = None
        self._applier: Any = None

    def _start(self) -> Executor:
        if self.in_process:
            # spawn, not fork: the worker has threads (librdkafka, aiokafka) a fork would copy
            # mid-flight; the topology is handed over as YAML and parsed again
            return ProcessPoolExecutor(
                max_workers=1,
                mp_context=_PlainSpawnContext(),
                initializer=_child_init,
                initargs=(
                    os.getpid(),
                    yaml.safe_dump(dict(self.topology.raw), sort_keys=False, allow_unicode=True),
                    self.topology.path,
                    self.settings,
                    self.system,
                ),
            )
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"apply-{self.system}")

    def _open_here(self) -> str:
        if self._applier is None:
            self._applier = open_applier(self.topology, self.settings, self.system, self.applier_cls)
        return str(self._applier.origin)

    def _apply_here(self, values: list[bytes]) -> tuple[Any, str]:
        self._open_here()
        try:
            return self._applier.apply_batch([ApplyCommand.from_json(v) for v in values]), self._applier.origin
        except Exception:
            if _forget_if_broken(self._applier):
                self._applier = None
            raise

    def _executor_now(self) -> Executor:
        if self._executor is None:
            self._executor = self._start()  # from the event loop's thread (see PR_SET_PDEATHSIG)
        return self._executor

    async def open(self) -> str:
        """Start the applier (process, connection, replication origin) before the first batch, so
        the first commands do not wait for it; returns the origin."""
        fn = _child_open if self.in_process else self._open_here
        return await asyncio.wrap_future(self._executor_now().submit(fn))

    async def apply(self, values: list[bytes]) -> tuple[Any, str]:
        """Apply one batch; (ApplyResult, replication origin). A dead applier process raises
        ``BrokenProcessPool`` once; the next call starts a new one. See :meth:`apply_until_done`."""
        fn = _child_apply if self.in_process else self._apply_here
        try:
            return await asyncio.wrap_future(self._executor_now().submit(fn, values))
        except BrokenProcessPool:
            self.close()
            raise

    async def apply_until_done(self, values: list[bytes]) -> tuple[Any, str]:
        """:meth:`apply`, tried again after a failure that passes (:func:`passing_failure`) until
        it goes through: waits of 0.5, 1, 2 … 30 s, each failure logged and counted
        (``archsync_apply_retries_total``), ``archsync_apply_retrying`` 1 meanwhile. A batch
        applied before its result was lost (the connection dropped after the commit) is skipped by
        its guards when tried again. Other errors are raised."""
        failures = 0
        while True:
            try:
                done = await self.apply(values)
            except Exception as exc:
                if not passing_failure(exc):
                    raise
                delay = retry_delay(failures)
                failures += 1
                metrics.APPLY_RETRIES.labels(self.system, type(exc).__name__).inc()
                metrics.APPLY_RETRYING.labels(self.system).set(1)
                log.warning(
                    "could not apply %d commands to %s (attempt %d): %s: %s; trying again in %.1f s",
                    len(values),
                    self.system,
                    failures,
                    type(exc).__name__,
                    first_line(exc),
                    delay,
                    extra={"target": self.system, "commands": len(values), "attempt": failures},
                )
                await asyncio.sleep(delay)
                continue
            if failures:
                metrics.APPLY_RETRYING.labels(self.system).set(0)
                log.warning("applied to %s again after %d failed attempts", self.system, failures)
            return done

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
