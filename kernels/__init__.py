"""dsv4.kernels."""
