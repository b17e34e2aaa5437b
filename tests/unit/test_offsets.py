from __future__ import annotations

import pytest

from connectors.offsets import FlushTracker, ProduceFailed


def test_confirms_only_acknowledged_prefix() -> None:
    t = FlushTracker(confirmed_lsn=100)
    a, b, c = t.open(200), t.open(300), t.open(400)
    for unit, n in ((a, 2), (b, 1), (c, 3)):
        t.add(unit, n)
        t.seal(unit)
    t.ack(b)  # b done, but a is not
    assert t.advance() == 100
    t.ack(a)
    assert t.advance() == 100
    t.ack(a)
    assert t.advance() == 300  # a and b
    t.ack(c)
    t.ack(c)
    assert t.advance() == 300
    t.ack(c)
    assert t.advance() == 400
    assert t.in_flight == 0


def test_unsealed_unit_blocks() -> None:
    t = FlushTracker()
    u = t.open(10)
    t.add(u)
    t.ack(u)
    assert t.advance() == 0  # more records may still come
    t.seal(u)
    assert t.advance() == 10


def test_empty_unit_confirms_when_sealed() -> None:
    t = FlushTracker()
    t.seal(t.open(50))  # e.g. an own-origin transaction: nothing produced
    assert t.advance() == 50


def test_failure_stops_confirmation() -> None:
    t = FlushTracker()
    u = t.open(10)
    t.add(u)
    t.seal(u)
    t.callback(u)("broker said no", None)
    with pytest.raises(ProduceFailed, match="broker said no"):
        t.advance()
    assert t.confirmed_lsn == 0


def test_idle_advance_only_when_nothing_in_flight() -> None:
    t = FlushTracker(confirmed_lsn=5)
    u = t.open(10)
    assert t.idle_advance(1000) == 5
    t.seal(u)
    t.advance()
    assert t.idle_advance(1000) == 1000
    assert t.idle_advance(900) == 1000
