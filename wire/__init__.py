"""dsv4.wire: the plain data that crosses the coordinator/worker and engine/server boundaries — the serving
configuration, requests, sampling parameters and outputs, the coordinator's plans and the workers' results, the
model description and the expert placement. A leaf: it imports only the standard library, so `cluster` and
`workers` both depend on it and never on each other."""
