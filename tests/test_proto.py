"""The wire contract: committed stubs are exactly what grpcio-tools generates from proto/."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTOS = ("proto/ecsearch/v1/search.proto", "proto/ecsearch/v1/admin.proto")
STUBS = ("search_pb2.py", "search_pb2.pyi", "search_pb2_grpc.py", "admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")


def generate_stubs(out: Path) -> Path:
    """Run the `make proto` command with its outputs redirected to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-Iserver/gen=proto",
           f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *PROTOS]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return out / "server" / "gen" / "ecsearch" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    fresh = generate_stubs(tmp_path)
    committed = REPO / "server" / "gen" / "ecsearch" / "v1"
    for name in STUBS:
        assert (fresh / name).read_bytes() == (committed / name).read_bytes(), (
            f"server/gen/ecsearch/v1/{name} is stale: run `make proto` and commit the result")


def test_generation_is_deterministic(tmp_path):
    first = generate_stubs(tmp_path / "a")
    second = generate_stubs(tmp_path / "b")
    for name in STUBS:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_service_contract():
    from server.gen.ecsearch.v1 import search_pb2

    service = search_pb2.DESCRIPTOR.services_by_name["SearchService"]
    assert service.full_name == "ecsearch.v1.SearchService"
    methods = {m.name: (m.input_type.name, m.output_type.name) for m in service.methods}
    assert methods == {"Search": ("SearchRequest", "SearchResponse"),
                       "GetProducts": ("GetProductsRequest", "GetProductsResponse")}
    request = search_pb2.SearchRequest(text="red dress")
    assert not request.HasField("top_k") and not request.HasField("nprobe")  # presence tracked
    request.top_k = 0
    assert request.HasField("top_k")  # an explicit 0 is distinguishable from "absent"
    hit_fields = {f.name for f in search_pb2.Hit.DESCRIPTOR.fields}
    assert hit_fields == {"product_id", "score", "rank", "metadata"}
    timing_fields = [f.name for f in search_pb2.StageTimings.DESCRIPTOR.fields]
    assert all(name.endswith("_ms") for name in timing_fields)
