"""Python stubs for the daemon's gRPC API, generated on demand.

``load_stubs()`` compiles ``proto/sockscope/v1/sockscope.proto`` with
grpcio-tools into ``<logs>/pyproto`` (regenerated when the proto changes)
and returns the ``(sockscope_pb2, sockscope_pb2_grpc)`` modules.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "proto"
PROTO_FILE = "sockscope/v1/sockscope.proto"


class StubError(RuntimeError):
    """The proto could not be compiled."""


def load_stubs(out_root: Path | None = None):
    """Compile (if needed) and import the sockscope.v1 stubs."""
    import grpc_tools
    from grpc_tools import protoc

    import bed

    src = PROTO_ROOT / PROTO_FILE
    if not src.exists():
        raise StubError(f"{src} does not exist")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    out = (out_root or bed.logs_root()) / "pyproto" / digest
    if not (out / "sockscope/v1/sockscope_pb2_grpc.py").exists():
        out.mkdir(parents=True, exist_ok=True)
        well_known = Path(grpc_tools.__file__).parent / "_proto"
        rc = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}",
                          f"--grpc_python_out={out}", str(src)])
        if rc != 0:
            raise StubError(f"protoc failed ({rc}) on {src}")
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    pb2 = importlib.import_module("sockscope.v1.sockscope_pb2")
    pb2_grpc = importlib.import_module("sockscope.v1.sockscope_pb2_grpc")
    return pb2, pb2_grpc
