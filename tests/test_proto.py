"""The wire contract: committed stubs are exactly what grpcio-tools generates from proto/."""
from __future__ import annotations

import re
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


# The generator's own version stamps: a grpcio-tools patch release changes them and nothing else,
# so a fresh install of a newer grpcio-tools must not call the committed stubs stale. The
# stamps are minimum runtime versions; the committed (older) ones stay valid.
_VERSION_STAMPS = (
    (re.compile(rb"GRPC_GENERATED_VERSION = '[0-9.]+'"), b"GRPC_GENERATED_VERSION = 'X'"),
    (re.compile(rb"# Protobuf Python Version: [0-9.]+"), b"# Protobuf Python Version: X"),
    (re.compile(rb"(_runtime_version\.Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n"), rb"\1X\n"),
)


def without_version_stamps(code: bytes) -> bytes:
    """``code`` with the generator's version stamps replaced by ``X``."""
    for pattern, replacement in _VERSION_STAMPS:
        code = pattern.sub(replacement, code)
    return code


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    fresh = generate_stubs(tmp_path)
    committed = REPO / "server" / "gen" / "ecsearch" / "v1"
    for name in STUBS:
        assert without_version_stamps((fresh / name).read_bytes()) == \
            without_version_stamps((committed / name).read_bytes()), (
            f"server/gen/ecsearch/v1/{name} is stale: run `make proto` and commit the result")


def test_version_stamps_are_the_only_thing_ignored():
    stub = (REPO / "server" / "gen" / "ecsearch" / "v1" / "search_pb2_grpc.py").read_bytes()
    bumped = re.sub(rb"GRPC_GENERATED_VERSION = '[0-9.]+'", b"GRPC_GENERATED_VERSION = '9.99.9'", stub)
    assert bumped != stub and without_version_stamps(bumped) == without_version_stamps(stub)
    pb2 = (REPO / "server" / "gen" / "ecsearch" / "v1" / "search_pb2.py").read_bytes()
    assert b"X\n" in without_version_stamps(pb2).split(b"Domain.PUBLIC,", 1)[1][:4]
    assert without_version_stamps(stub.replace(b"SearchService", b"SearchServicf")) != without_version_stamps(stub)


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
