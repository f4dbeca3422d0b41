"""bench/bench_grpc.py's ``start_server``: a real ``ecsearch serve`` process on loopback that binds its
port and then refuses to serve must end the bench with the server's own reason, not a gRPC traceback."""
from __future__ import annotations

import pytest

from bench.bench_grpc import start_server
from tests.test_server_support import index_root, server_model, subset  # noqa: F401  (fixtures)


def test_a_server_that_refuses_the_model_ends_the_bench_with_its_reason(index_root, tiny_backbone_dir, tmp_path):
    from engine.model.model_folder import save_model
    from tests.tiny_models import make_tiny_model

    other = tmp_path / "other-model"  # another model: the index version recorded a different fingerprint
    save_model(make_tiny_model(tiny_backbone_dir, seed=4, share_fusion=True), other)
    with pytest.raises(SystemExit) as raised:
        start_server(index_root, str(other), [])
    message = str(raised.value)
    assert "before SERVING" in message and "refusing to start: model fingerprint" in message, message


def test_a_server_that_starts_is_serving_when_start_server_returns(index_root, server_model):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc, target = start_server(index_root, str(server_model[1]), [])
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
