"""Durable state (SQLite, WAL) and the Parquet caption output. Knows nothing of websockets."""
