"""Source connectors: PostgreSQL logical replication decoding and value conversion."""
