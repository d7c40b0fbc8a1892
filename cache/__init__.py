"""dsv4.cache: KV-cache sizing, block and slot allocation (pure Python: the coordinator imports these), and the
worker's pool tensors (`dsv4.cache.pools`, the one module that touches torch)."""
