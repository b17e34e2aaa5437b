"""archsync: keeps an OA approval system and an electronic accounting archive in sync through Kafka."""

__version__ = "0.1.0"
