"""``archsync topology show``: sources → topics → agents → sinks, for both shipped topologies."""

from __future__ import annotations

from pathlib import Path

from topology.graph import topology_graph
from topology.model import load_topology

REPO = Path(__file__).resolve().parents[2]


def test_reference_graph_names_every_stage() -> None:
    text = "\n".join(topology_graph(load_topology()))
    assert "public.oa_form" in text and "archsync.oa.public.oa_form" in text
    assert "aggregate form member, by form_id" in text
    assert "flow approved_form_to_item: oa form on oa_form" in text
    assert "--> upsert archive.public.arc_item (echo)" in text
    assert "upsert for each archive.public.arc_file" in text  # the child command, indented
    assert "agent apply_archive" in text and "replication origin archsync_apply_archive" in text
    assert "agent audit" in text and "archsync.audit (compacted)" in text
    assert "own-origin writers skipped: archsync_apply_oa, archsync_apply_archive" in text


def test_every_example_topology_has_a_graph() -> None:
    for path in sorted((REPO / "topology" / "examples").glob("*.yaml")):
        lines = topology_graph(load_topology(path))
        assert any(line.startswith("agent transform") for line in lines), path
        assert sum(line.strip().startswith("flow ") for line in lines) >= 1, path


def test_cli_prints_the_graph() -> None:
    from click.testing import CliRunner

    from archsync.cli import cli

    result = CliRunner().invoke(
        cli, ["--topology", str(REPO / "topology" / "examples" / "acme.yaml"), "topology", "show"]
    )
    assert result.exit_code == 0, result.output
    assert "sources (capture) --> captured topics" in result.output and "agent transform" in result.output
