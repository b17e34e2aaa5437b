"""Avro schemas of archsync's records, their registry and codecs; the reference SQL schemas."""
