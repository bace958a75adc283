"""The Parquet warehouse: layout, schemas, atomic partition writes (see docs/warehouse.md)."""
