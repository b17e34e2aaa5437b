"""archsync schemas: versioned Avro schemas (``schemas/avro``), the registry and the event codecs.

from schemas.codec import ChangeEventCodec, event_id, key_bytes
from schemas.registry import load_schema, check_all
"""
