"""The store: object storage, the PostgreSQL index, QIDO matching and retrieval."""
