"""Regenerates the committed gRPC stubs from brigade.proto.

Run ``python -m brigade.protocol.generate_stubs`` after editing the .proto; the test
``tests/protocol/test_stubs_current.py`` fails while the committed stubs are stale.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = PROTO_DIR / "brigade.proto"
STUB_NAMES = ("brigade_pb2.py", "brigade_pb2_grpc.py", "brigade_pb2.pyi")


def render_stubs() -> dict[str, str]:
    """Runs protoc (from grpcio-tools) into a temp dir and returns the stub files' text."""
    from grpc_tools import protoc  # dev dependency: only needed to regenerate

    with tempfile.TemporaryDirectory() as out:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_FILE),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on brigade.proto")
        texts = {name: (Path(out) / name).read_text() for name in STUB_NAMES}
    # protoc emits a top-level import; inside the package the stub must import its sibling.
    texts["brigade_pb2_grpc.py"] = re.sub(
        r"^import brigade_pb2 as", "from brigade.protocol import brigade_pb2 as",
        texts["brigade_pb2_grpc.py"], flags=re.M,
    )
    return texts


def main() -> int:
    for name, text in render_stubs().items():
        (PROTO_DIR / name).write_text(text)
    print(f"wrote {', '.join(STUB_NAMES)} to {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
