"""The committed protobuf stubs are exactly what `python -m dsv4.protos.generate` produces."""

from __future__ import annotations

import importlib

from dsv4.protos import generate


def test_committed_stubs_equal_freshly_generated_ones() -> None:
    assert generate.stale_stubs() == [], "run `python -m dsv4.protos.generate` and commit the stubs"


def test_stubs_import_as_a_package() -> None:
    grpc_stub = importlib.import_module("dsv4.protos.dsv4_pb2_grpc")
    assert grpc_stub.dsv4__pb2.__name__ == "dsv4.protos.dsv4_pb2"
    assert hasattr(grpc_stub, "Dsv4EngineStub")


def test_check_mode_exit_code() -> None:
    assert generate.main(["--check"]) == 0
