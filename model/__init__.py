"""dsv4.model."""
