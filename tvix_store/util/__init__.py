"""Small concurrency and bookkeeping helpers with no knowledge of the store: `counters`
(thread-safe named integers), `singleflight` (one fetch per key, with a thread face and a
trio face). Same layer as `tvix_store.core`: imports nothing of the project."""
