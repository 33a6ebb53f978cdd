"""prepare: volumes found, sliced and written as Parquet shards (one Ray task per volume)."""
