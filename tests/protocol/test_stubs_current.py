"""The committed gRPC stubs are exactly what the generator makes from brigade.proto today."""

from __future__ import annotations

import pytest

from brigade.protocol.generate_stubs import PROTO_DIR, render_stubs


def test_committed_stubs_are_current() -> None:
    pytest.importorskip("grpc_tools")
    for name, text in render_stubs().items():
        committed = (PROTO_DIR / name).read_text()
        assert committed == text, f"{name} is stale: run `python -m brigade.protocol.generate_stubs`"
