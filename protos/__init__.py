"""dsv4.protos."""
