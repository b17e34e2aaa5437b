"""``archsync topology show``: the graph of a topology — sources → topics → agents → sinks (pure)."""

from __future__ import annotations

from topology.audit_config import audit_config
from topology.flows import CommandSpec
from topology.model import Topology


def _commands(spec: CommandSpec, depth: int = 0) -> list[str]:
    echo = " (echo)" if spec.echo else ""
    each = " for each" if spec.for_each is not None else ""
    lines = [f"{'  ' * depth}{spec.action}{each} {spec.target_system}.{spec.table}{echo}"]
    for child in spec.children:
        lines += _commands(child, depth + 1)
    return lines


def topology_graph(topology: Topology) -> list[str]:
    """The lines ``archsync topology show`` prints."""
    t = topology.topics
    prefix = t.prefix
    out: list[str] = [f"topology {topology.name} ({topology.path}): topics {prefix}.*, {t.partitions} partitions", ""]
    routes: dict[tuple[str, str], str] = {}
    for agg in topology.aggregates.values():
        routes[(agg.source, agg.root)] = f"aggregate {agg.name} root, key {agg.key}"
        for member, column in agg.members.items():
            routes.setdefault((agg.source, member), f"aggregate {agg.name} member, by {column}")
    out.append("sources (capture) --> captured topics")
    for name, source in topology.sources.items():
        out.append(f"  {name} [{source.dsn_env}] slot {source.slot}, publication {source.publication}")
        for table in source.tables:
            schema, _, rel = table.partition(".")
            where = routes.get((name, table), "no aggregate: not transformed")
            out.append(f"    {table:34} --> {t.change_topic(name, schema, rel)}  ({where})")
    out.append(f"    own-origin writers skipped: {', '.join(topology.appliers)}")
    out.append(f"    bad rows --> {t.dead_letter_topic('capture')}")
    out.append("")
    out.append(f"agent transform (worker): the captured topics + {prefix}.changes (echoes, replayed dead letters)")
    for flow in topology.flows:
        on = ", ".join(table.split(".")[-1] for table in flow.on)
        ops = "".join(sorted(flow.ops))
        out.append(f"  flow {flow.name}: {flow.source_system} {flow.aggregate} on {on} [{ops}]")
        if flow.command is not None:
            out += [f"      --> {line}" for line in _commands(flow.command)]
        if flow.sync.mode != "realtime":
            out.append(f"      held: {flow.sync.mode} ({prefix}.held.{flow.name})")
        if flow.notify is not None:
            out.append(f"      notifies --> {prefix}.notifications")
    out.append(f"  --> {', '.join(f'{prefix}.apply.{s}' for s in topology.sources)}")
    out.append(f"  --> {prefix}.conflicts, {prefix}.dlq.normalise, {prefix}.dlq.transform")
    out.append("")
    for system in topology.sources:
        origin = next((a for a in topology.appliers if a.endswith(f"_{system}")), f"archsync_apply_{system}")
        out.append(
            f"agent apply_{system} (worker, applier process): {prefix}.apply.{system} --> {system} database"
            f" (replication origin {origin}); echoes --> {prefix}.changes; failures --> {prefix}.dlq.apply"
        )
    if audit_config(topology).enabled:
        out.append(f"agent audit (worker or --role audit): {prefix}.audit.facts --> {prefix}.audit (compacted)")
    return out
