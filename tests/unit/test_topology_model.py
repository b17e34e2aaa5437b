from __future__ import annotations

import pytest

from topology.model import TopologyError, load_topology, parse_topology


def test_reference_topology_loads() -> None:
    topo = load_topology()
    assert set(topo.sources) == {"oa", "archive"}
    oa = topo.source("oa")
    assert "public.oa_form" in oa.tables and oa.slot == "archsync_oa"
    assert topo.topics.change_topic("oa", "public", "oa_form") == "archsync.oa.public.oa_form"
    assert "archsync_apply_oa" in topo.appliers


def test_unknown_source_lists_known() -> None:
    with pytest.raises(TopologyError, match="known: archive, oa"):
        load_topology().source("erp")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version: 2\nsources: {}\n", ":1: version: unsupported topology version 2"),
        (
            "version: 1\nsources:\n  oa:\n    tables: [oa_form]\n",
            ":4: sources.oa.tables.0: expected schema.table",
        ),
        (
            "version: 1\nsources:\n  oa:\n    tables: [public.t]\n    heartbeat_seconds: -1\n",
            ":5: sources.oa.heartbeat_seconds: must be > 0",
        ),
        (
            "version: 1\nsources:\n  oa:\n    tables: [public.t]\n    colour: red\n",
            ":5: sources.oa.colour: unknown key",
        ),
        ("version: 1\nsources:\n  oa:\n    tables: [public.t]\n    snapshot: sometimes\n", "must be one of"),
        ("version: 1\nsources: [\n", "not valid YAML"),
        ("version: 1\n", "missing required key 'sources'"),
        (
            "version: 1\ntopics:\n  config:\n    cleanup.policy: compact\nsources: {}\n",
            ":4: topics.config.cleanup.policy: the pipeline's topics cannot be compacted",
        ),
    ],
)
def test_errors_name_key_and_line(text: str, needle: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, "t.yaml")
    assert needle in str(info.value)
