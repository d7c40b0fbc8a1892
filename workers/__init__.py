"""dsv4.workers."""
