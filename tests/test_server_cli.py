"""`ecsearch serve` as a real process (SIGTERM → graceful exit 0), `ecsearch query`, and TLS."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.cli import main as ecsearch
from server.client import SearchClient
from server.client_cli import format_table, parse_filter_args
from tests.test_server_support import (copy_root, index_root, server_model, start_server,  # noqa: F401
                                       subset)

REPO = Path(__file__).resolve().parents[1]


def _start_serve(root: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--index-root", str(root),
                             "--port", "0", "--poll-interval-s", "0.2", *extra],
                            cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
    proc.kill()
    pytest.fail("server did not start:\n" + "".join(lines))


def _wait_serving(target: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
    pytest.fail("server never became SERVING")


def test_serve_then_query_cli_then_sigterm_finishes_in_flight_requests(tmp_path, index_root, subset, capsys):
    root = copy_root(index_root, tmp_path / "root")
    # a 1.5 s batching window keeps requests in flight long enough to send SIGTERM among them
    proc, target = _start_serve(root, "--max-wait-ms", "1500", "--max-batch-size", "64", "--grace-s", "20")
    try:
        _wait_serving(target)
        product = subset.products[7]
        assert ecsearch(["query", "--target", target, "--image", product.image, "--top-k", "3"]) == 0
        out = capsys.readouterr().out
        first_row = out.splitlines()[2].split()
        assert first_row[:1] == ["1"] and first_row[2] == product.product_id
        assert "hits from index version" in out

        assert ecsearch(["query", "--target", target, "--text", "shoes", "--filter", "gender=Women",
                         "--columns", "gender"]) == 0
        rows = capsys.readouterr().out.splitlines()[2:-1]
        assert rows and all(row.split()[-1] == "Women" for row in rows)

        assert ecsearch(["query", "--target", target, "--text", "   "]) == 1
        assert "INVALID_ARGUMENT: blank text" in capsys.readouterr().err

        with SearchClient(target, timeout_s=60) as client:
            client.search(text="warm up the channel")
            futures = [client.stub.Search.future(
                client_request(text=f"in flight {n}")) for n in range(8)]
            time.sleep(0.5)  # received, waiting in the batching window
            proc.send_signal(signal.SIGTERM)
            responses = [f.result(timeout=60) for f in futures]
        assert all(len(r.hits) == 10 for r in responses)
        assert proc.wait(60) == 0
        assert "signal received" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def client_request(**kwargs):
    from server.client import build_search_request

    return build_search_request(**kwargs)


def test_serve_refuses_to_start_without_a_usable_model(tmp_path, index_root):
    root = copy_root(index_root, tmp_path / "root")
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--index-root", str(root), "--port", "0",
                           "--model", str(tmp_path / "no-such-model")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to start" in proc.stderr and "no-such-model" in proc.stderr


def test_tls(tmp_path, index_root):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = start_server(copy_root(index_root, tmp_path / "root"), tls_cert=cert, tls_key=key)
    try:
        server.wait_serving()
        target = f"localhost:{server.port}"
        with SearchClient(target, tls_ca=cert) as client:
            assert len(client.search(text="shirt", top_k=4).hits) == 4
        with SearchClient(target, timeout_s=5) as plaintext:
            with pytest.raises(grpc.RpcError) as err:
                plaintext.search(text="shirt")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_filter_argument_parsing_and_table():
    assert parse_filter_args(["gender=Women", "articleType=Heels", "articleType=Flats"]) == {
        "gender": ["Women"], "articleType": ["Heels", "Flats"]}
    with pytest.raises(ValueError):
        parse_filter_args(["gender"])
    table = format_table([["1", "0.9", "x" * 60]], ["rank", "score", "title"]).splitlines()
    assert table[0].split() == ["rank", "score", "title"] and table[2].endswith("…")
