"""Regenerate the Python code for `node.proto`, or check that the committed code is current.

Run as `python -m homeswarm.protocol.regenerate [--check]` (also `make proto`).

Invariants:
- The generated modules import each other as `homeswarm.protocol.node_pb2`: protoc derives the
  import path from the proto's path relative to `-I`, so the proto is copied into a temporary
  tree at `homeswarm/protocol/node.proto` and protoc runs with `-I <tmp>`. The source folder is
  `protocol/`, not `homeswarm/protocol/`, which is why a plain `protoc -I .` would not do.
- `--check` writes nothing into the package; it exits 1 when a committed file differs from what
  protoc generates now (stale code after a schema edit), 0 when all match.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

PROTOCOL_DIR = Path(__file__).resolve().parent
PROTO_NAME = "node.proto"
GENERATED_NAMES = ("node_pb2.py", "node_pb2.pyi", "node_pb2_grpc.py")
# The import path the generated code must use for itself; mirrors the installed package name.
PACKAGE_PATH = Path("homeswarm") / "protocol"


def generate(out_dir: Path, proto_dir: Path = PROTOCOL_DIR) -> dict[str, bytes]:
    """Run protoc on `proto_dir/node.proto`; write the generated files into `out_dir`.

    Returns the generated files' contents by file name.
    """
    # Imported here so that importing this module (or the package) never needs grpcio-tools,
    # which is a development dependency only.
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory(prefix="homeswarm-proto-") as tmp:
        tree = Path(tmp)
        package_dir = tree / PACKAGE_PATH
        package_dir.mkdir(parents=True)
        shutil.copyfile(proto_dir / PROTO_NAME, package_dir / PROTO_NAME)
        # protoc's own include dir holds the well-known types (google/protobuf/*.proto).
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{tree}",
            f"-I{well_known}",
            f"--python_out={tree}",
            f"--pyi_out={tree}",
            f"--grpc_python_out={tree}",
            str(PACKAGE_PATH / PROTO_NAME),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        contents: dict[str, bytes] = {}
        for name in GENERATED_NAMES:
            data = (package_dir / name).read_bytes()
            (out_dir / name).write_bytes(data)
            contents[name] = data
    return contents


def stale_files(proto_dir: Path = PROTOCOL_DIR) -> list[str]:
    """Names of generated files in `proto_dir` that are missing or differ from protoc's output now."""
    with tempfile.TemporaryDirectory(prefix="homeswarm-proto-check-") as tmp:
        fresh = generate(Path(tmp), proto_dir)
    stale = []
    for name, data in fresh.items():
        committed = proto_dir / name
        if not committed.is_file() or committed.read_bytes() != data:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary folder and exit 1 if the committed files differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(
                f"stale generated code: {', '.join(stale)}; run `make proto` and commit",
                file=sys.stderr,
            )
            return 1
        print("generated code is current")
        return 0
    generate(PROTOCOL_DIR)
    print(f"regenerated {', '.join(GENERATED_NAMES)} in {PROTOCOL_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
