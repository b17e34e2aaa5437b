"""The ``audit`` section of a topology (issue 5: the tamper-evident audit log)::

audit:
  enabled: true                 # default true; false: no audit agent, no audit facts (to measure its cost)
  fixity_interval_seconds: 0    # > 0: the worker re-hashes archived files this often (0: only `archsync audit fixity`)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from topology.model import _Reader


@dataclass(frozen=True)
class AuditConfig:
    enabled: bool = True
    fixity_interval_seconds: float = 0.0


def parse_audit(r: _Reader, top: Mapping[str, Any]) -> AuditConfig:
    keys = ("audit",)
    m = r.mapping(top.get("audit", {}) or {}, keys, {"enabled", "fixity_interval_seconds"})
    interval = r.get(m, keys, "fixity_interval_seconds", float, 0.0)
    if interval < 0:
        raise r.fail((*keys, "fixity_interval_seconds"), "must be >= 0")
    return AuditConfig(enabled=r.get(m, keys, "enabled", bool, True), fixity_interval_seconds=interval)


def audit_config(topology: Any) -> AuditConfig:
    """The topology's audit settings (defaults when the section is absent)."""
    return getattr(topology, "audit", None) or AuditConfig()
