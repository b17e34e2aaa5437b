"""Kafka administration: broker checks and topic provisioning, with one-line errors."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from archsync.errors import ConfigError
from archsync.settings import ENV_KAFKA_BOOTSTRAP

log = logging.getLogger(__name__)
# librdkafka's own messages (connection retries…) go to this logger, at debug by default
RDKAFKA_LOG = logging.getLogger("archsync.librdkafka")
RDKAFKA_LOG.setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class TopicSpec:
    """A topic archsync owns: name, partitions and topic-level configs."""

    name: str
    partitions: int = 1
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)


def admin_client(bootstrap: str) -> AdminClient:
    """An AdminClient that gives up quickly on a broker that is not there."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "socket.connection.setup.timeout.ms": 3000,
        "logger": RDKAFKA_LOG,
    }
    return AdminClient(config)


def check_broker(bootstrap: str, timeout: float = 6.0) -> int:
    """Return the number of brokers answering at ``bootstrap``; raise ConfigError if none does."""
    try:
        metadata = admin_client(bootstrap).list_topics(timeout=timeout)
    except KafkaException as exc:
        raise ConfigError(
            ENV_KAFKA_BOOTSTRAP,
            f"no Kafka broker answers at {bootstrap} within {timeout:g} s ({exc.args[0].str()})",
        ) from None
    return len(metadata.brokers)


def ensure_topics(bootstrap: str, specs: Iterable[TopicSpec], timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created. Existing ones are kept."""
    admin = admin_client(bootstrap)
    wanted = {spec.name: spec for spec in specs}
    if not wanted:
        return []
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise ConfigError(ENV_KAFKA_BOOTSTRAP, f"cannot list topics at {bootstrap}: {exc.args[0]}") from None
    missing = [
        NewTopic(
            s.name,
            num_partitions=s.partitions,
            replication_factor=s.replication_factor,
            config=dict(s.config),
        )
        for name, s in wanted.items()
        if name not in existing
    ]
    created: list[str] = []
    if not missing:
        return created
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
            log.info("topic created", extra={"topic": name})
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise ConfigError("topics", f"cannot create topic {name}: {exc.args[0].str()}") from None
    return created


def delete_topics(bootstrap: str, names: Iterable[str], timeout: float = 30.0) -> None:
    """Delete topics, ignoring those that do not exist."""
    names = list(names)
    if not names:
        return
    admin = admin_client(bootstrap)  # keep the handle alive until the futures resolve
    for _name, future in admin.delete_topics(names, operation_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
