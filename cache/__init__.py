"""dsv4.cache."""
