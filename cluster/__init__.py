"""dsv4.cluster."""
