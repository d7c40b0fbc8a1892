"""Regenerate the committed Python stubs for `dsv4.proto` with `grpc_tools.protoc`.

    python -m dsv4.protos.generate            # rewrite protos/dsv4_pb2.py, dsv4_pb2.pyi, dsv4_pb2_grpc.py
    python -m dsv4.protos.generate --check    # exit 1 if the committed stubs differ from fresh ones

protoc writes `import dsv4_pb2` into the gRPC stub, which only works with `protos/` on sys.path; the import is
rewritten to the package path so the stubs import as `dsv4.protos.dsv4_pb2`. The output depends only on the
proto file and the installed grpcio-tools version; the check ignores the generator's version stamp.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "dsv4.proto"
STUB_FILES = ("dsv4_pb2.py", "dsv4_pb2.pyi", "dsv4_pb2_grpc.py")

_PROTOC_IMPORT = "import dsv4_pb2 as dsv4__pb2"
_PACKAGE_IMPORT = "from dsv4.protos import dsv4_pb2 as dsv4__pb2"


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for `dsv4.proto` into `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_DIR / PROTO_FILE)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_FILE}")
    grpc_stub = out_dir / "dsv4_pb2_grpc.py"
    source = grpc_stub.read_text()
    if _PROTOC_IMPORT not in source:
        raise RuntimeError(f"protoc output changed: {_PROTOC_IMPORT!r} not found in {grpc_stub}")
    grpc_stub.write_text(source.replace(_PROTOC_IMPORT, _PACKAGE_IMPORT))
    return [out_dir / name for name in STUB_FILES]


def _content(path: Path) -> str:
    """A stub's text without grpcio-tools' version stamp: a newer patch release of the generator writes its own
    version there (and the stub then demands at least that grpcio), the rest is the same. The committed stubs keep
    the stamp of the oldest grpcio the project supports (pyproject's grpcio minimum)."""
    return re.sub(r"^GRPC_GENERATED_VERSION = .*$", "", path.read_text(), flags=re.MULTILINE)


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (empty when up to date)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [path.name for path in fresh
                if not (PROTO_DIR / path.name).is_file() or _content(PROTO_DIR / path.name) != _content(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare the committed stubs with fresh ones")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale stubs: {', '.join(stale)}; run `python -m dsv4.protos.generate`", file=sys.stderr)
            return 1
        return 0
    for path in generate(PROTO_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
