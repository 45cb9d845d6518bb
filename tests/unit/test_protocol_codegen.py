"""The committed generated code matches node.proto, and imports under the installed package name."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) generates the code")

from homeswarm.protocol import regenerate  # noqa: E402


def test_committed_generated_code_is_current() -> None:
    stale = regenerate.stale_files()
    assert stale == [], f"stale generated code {stale}: run `make proto` and commit the result"


def test_check_detects_a_schema_edit(tmp_path: Path) -> None:
    # The check must be able to fail: one more message changes the messages' module and stub
    # (not the service's), and a missing generated file is stale too.
    for name in (regenerate.PROTO_NAME, *regenerate.GENERATED_NAMES):
        shutil.copyfile(regenerate.PROTOCOL_DIR / name, tmp_path / name)
    assert regenerate.stale_files(tmp_path) == []
    proto = tmp_path / regenerate.PROTO_NAME
    proto.write_text(proto.read_text() + "\nmessage Extra {\n  uint32 x = 1;\n}\n")
    (tmp_path / "node_pb2_grpc.py").unlink()
    assert sorted(regenerate.stale_files(tmp_path)) == ["node_pb2.py", "node_pb2.pyi", "node_pb2_grpc.py"]


def test_generated_modules_import_each_other_by_package_name() -> None:
    from homeswarm.protocol import node_pb2, node_pb2_grpc

    source = (regenerate.PROTOCOL_DIR / "node_pb2_grpc.py").read_text()
    assert "from homeswarm.protocol import node_pb2" in source
    assert node_pb2.DESCRIPTOR.name == "homeswarm/protocol/node.proto"
    assert node_pb2.DESCRIPTOR.package == "homeswarm.v1"
    assert hasattr(node_pb2_grpc, "NodeStub") and hasattr(node_pb2_grpc, "add_NodeServicer_to_server")
