"""The main job, end to end: train → index → serve → query (``make demo``; ``make stop``).

Steps (each reuses its output when it is still valid, so a second run takes minutes):

1. train the default model on the train split → ``var/model`` (reused when the model folder
   loads and was trained on the same catalogue and limit);
2. build and publish an index version over the whole catalogue → ``var/index`` (reused when
   CURRENT was built from this model and this catalogue); the backbone tokens training
   cached in ``var/cache`` are reused, so only the products training did not see run the
   backbones (``ecsearch index --token-cache``);
3. start ``ecsearch serve`` on 127.0.0.1:50051 in the background (log ``var/server.log``,
   pid ``var/server.pid``) and wait for gRPC health SERVING;
4. send real queries over gRPC (text, image, text+image, filtered) and print the hits;
5. start the search page (``ecsearch ui`` on 127.0.0.1:8080, ``DEMO_UI_PORT`` to change; log
   ``var/ui.log``, pid ``var/ui.pid``) and wait until it answers;
6. leave the server and the page running and print their addresses and how to stop them
   (``make stop`` stops both).

``DEMO_LIMIT=N`` runs the same flow on the first N catalogue rows (its own folders under
``var/``). ``ECSEARCH_DATA`` overrides the catalogue folder, ``ECSEARCH_DEMO_PORT`` the port. Orchestration only: every step
runs the ``ecsearch`` CLI in a subprocess. Source: our choice (issue 6).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VAR = REPO / "var"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "fashion-products"
HOST, PORT = "127.0.0.1", int(os.environ.get("ECSEARCH_DEMO_PORT", "50051"))  # override: another demo runs
UI_PORT = int(os.environ.get("DEMO_UI_PORT", "8080"))
STATE_FILE = "demo-state.json"


def _ecsearch(*args: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", *args]


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _catalog_key(data: Path, limit: int | None) -> str:
    """Cheap identity of the catalogue as the demo uses it: styles.csv bytes + limit."""
    digest = hashlib.sha256((data / "styles.csv").read_bytes())
    digest.update(f"limit={limit}".encode())
    return digest.hexdigest()


def _load_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _run(cmd: list[str]) -> None:
    print("$ ecsearch " + " ".join(cmd[3:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def ensure_model(data: Path, folder: Path, limit: int | None, catalog_key: str) -> str:
    """Train unless ``folder`` holds a loadable model trained on this catalogue; returns its fingerprint."""
    from engine.model.errors import ModelFolderError
    from engine.model.model_folder import check_model_folder, fingerprint_folder

    state = _load_state(folder)
    if state.get("catalog_key") == catalog_key:
        try:
            fingerprint = check_model_folder(folder)  # files, format, backbone fingerprints; builds no model
            if fingerprint == state.get("model_fingerprint"):
                print(f"model: reusing {folder} (fingerprint {fingerprint[:12]})")
                return fingerprint
        except ModelFolderError as exc:
            print(f"model: {folder} is not reusable ({exc}); training again")
    cmd = _ecsearch("train", "--catalog", str(data), "--out", str(folder), "--cache-dir", str(VAR / "cache"))
    if limit:
        # A quick look: fewer, smaller steps on a subset (the full recipe is for the whole catalogue).
        steps = max(60, min(300, limit // 4))
        cmd += ["--limit", str(limit), "--steps", str(steps), "--stage1-steps", str(steps // 5), "--batch-size", "64"]
    _run(cmd)
    fingerprint = fingerprint_folder(folder)
    (folder / STATE_FILE).write_text(json.dumps({"catalog_key": catalog_key, "model_fingerprint": fingerprint}))
    return fingerprint


def ensure_index(data: Path, model: Path, root: Path, limit: int | None, model_fingerprint: str,
                 catalog_key: str) -> None:
    """Build and publish unless ROOT/CURRENT was built from this model and catalogue."""
    from indexer.search import open_index

    state = _load_state(root)
    if state.get("catalog_key") == catalog_key and state.get("model_fingerprint") == model_fingerprint:
        try:
            index = open_index(root)
            version = index.version
            same = index.manifest.get("model", {}).get("fingerprint", model_fingerprint) == model_fingerprint
            index.close()
            if same and version == state.get("version"):
                print(f"index: reusing {root} (version {version})")
                return
        except Exception as exc:  # any unreadable index is rebuilt, never trusted
            print(f"index: {root} is not reusable ({exc}); building again")
    cmd = _ecsearch("index", "--catalog", str(data), "--model", str(model), "--index-root", str(root),
                    "--shards", "2")
    if (VAR / "cache").is_dir():  # the backbone tokens training cached: only unseen products run the backbones
        cmd += ["--token-cache", str(VAR / "cache")]
    if limit:
        cmd += ["--limit", str(limit)]
    _run(cmd)
    index = open_index(root)
    state = {"catalog_key": catalog_key, "model_fingerprint": model_fingerprint, "version": index.version}
    index.close()
    root.mkdir(parents=True, exist_ok=True)
    (root / STATE_FILE).write_text(json.dumps(state))


def stop_process(name: str, quiet: bool = False) -> bool:
    """SIGTERM the demo process whose pid is in ``var/<name>.pid`` (``server`` or ``ui``) and
    wait for it (SIGKILL after 15 s); True if one ran."""
    label = {"server": "demo server", "ui": "search page"}[name]
    pid_file = VAR / f"{name}.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        if not quiet:
            print(f"no {label} is running (no var/{name}.pid)")
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink(missing_ok=True)
        if not quiet:
            print(f"{label} (pid {pid}) was not running")
        return False
    for _ in range(150):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    if not quiet:
        print(f"stopped the {label} (pid {pid})")
    return True


def stop_server(quiet: bool = False) -> bool:
    """SIGTERM the demo server named in ``var/server.pid`` and wait for it; True if one ran."""
    return stop_process("server", quiet)


def start_server(root: Path, model: Path, timeout_s: float = 180.0) -> int:
    """Start ``ecsearch serve`` detached; wait for gRPC health SERVING; return its pid."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stop_server(quiet=True)
    log = open(VAR / "server.log", "ab")
    proc = subprocess.Popen(_ecsearch("serve", "--index-root", str(root), "--model", str(model),
                                      "--host", HOST, "--port", str(PORT)),
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    (VAR / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"{HOST}:{PORT}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with status {proc.returncode}; see {VAR / 'server.log'}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return proc.pid
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit(f"the server did not report SERVING within {timeout_s:.0f} s; see {VAR / 'server.log'}")


def start_ui(data: Path, timeout_s: float = 60.0) -> str:
    """Start ``ecsearch ui`` detached beside the server (log ``var/ui.log``, pid ``var/ui.pid``),
    photos from ``data``; wait until the page answers; return its URL."""
    import urllib.request

    stop_process("ui", quiet=True)
    url = f"http://{HOST}:{UI_PORT}/"
    log = open(VAR / "ui.log", "ab")
    proc = subprocess.Popen(_ecsearch("ui", "--target", f"{HOST}:{PORT}", "--host", HOST, "--port", str(UI_PORT),
                                      "--catalog", str(data)),
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    (VAR / "ui.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            (VAR / "ui.pid").unlink(missing_ok=True)
            raise SystemExit(f"the search page exited with status {proc.returncode} (port {UI_PORT} taken? "
                             f"set DEMO_UI_PORT); see {VAR / 'ui.log'}")
        try:
            with urllib.request.urlopen(url + "healthz", timeout=1.0) as response:
                if response.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the search page did not answer within {timeout_s:.0f} s; see {VAR / 'ui.log'}")


def _print_hits(title: str, response) -> None:
    print(f"\n--- {title}")
    t = response.timings
    print(f"    index version {response.index_version}; decode {t.decode_ms:.1f} ms, encode {t.encode_ms:.1f} ms, "
          f"search {t.search_ms:.1f} ms, metadata {t.metadata_ms:.1f} ms, total {t.total_ms:.1f} ms")
    print(f"    {'rank':>4}  {'score':>6}  {'id':>6}  {'articleType':<16} {'colour':<10} title")
    for hit in response.hits:
        m = dict(hit.metadata)
        print(f"    {hit.rank:>4}  {hit.score:6.3f}  {hit.product_id:>6}  {m.get('articleType', ''):<16.16} "
              f"{m.get('baseColour', ''):<10.10} {m.get('productDisplayName', m.get('title', ''))}")


def pick_photo(data: Path, limit: int | None, article_type: str) -> tuple[str, str]:
    """(product id, title) of the first test-split product of ``article_type`` within the limit."""
    split = {r["id"]: r["split"] for r in csv.DictReader(open(data / "split.csv"))}
    rows = list(csv.DictReader(open(data / "styles.csv")))
    rows = rows[:limit] if limit else rows
    for row in rows:
        if row["articleType"] == article_type and split.get(row["id"]) == "test":
            return row["id"], row["productDisplayName"]
    return rows[0]["id"], rows[0]["productDisplayName"]


def run_queries(data: Path, limit: int | None) -> None:
    from server.client import SearchClient

    shirt_id, shirt_title = pick_photo(data, limit, "Tshirts")
    shoe_id, shoe_title = pick_photo(data, limit, "Casual Shoes")
    with SearchClient(f"{HOST}:{PORT}", timeout_s=30.0) as client:
        _print_hits('text: "black leather wallet for men"', client.search(text="black leather wallet for men", top_k=5))
        _print_hits(f"image: photo of product {shirt_id} ({shirt_title})",
                    client.search(image=data / "images" / f"{shirt_id}.jpg", top_k=5))
        _print_hits(f'text+image: photo of product {shoe_id} ({shoe_title}) + "in red"',
                    client.search(text="in red", image=data / "images" / f"{shoe_id}.jpg", top_k=5))
        _print_hits('filtered: "shoes for a party" with gender=Women, articleType in {Heels, Flats}',
                    client.search(text="shoes for a party", top_k=5,
                                  filters={"gender": "Women", "articleType": ["Heels", "Flats"]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stop", action="store_true", help="stop the demo server and exit")
    args = parser.parse_args(argv)
    if args.stop:
        stop_process("ui")
        stop_server()
        return 0
    data = Path(os.environ.get("ECSEARCH_DATA", DEFAULT_DATA))
    if not (data / "styles.csv").is_file():
        print(f"error: the fashion catalogue is not at {data} (set ECSEARCH_DATA)", file=sys.stderr)
        return 2
    limit = int(os.environ["DEMO_LIMIT"]) if os.environ.get("DEMO_LIMIT") else None
    suffix = f"-limit{limit}" if limit else ""
    model, root = VAR / f"model{suffix}", VAR / f"index{suffix}"
    VAR.mkdir(exist_ok=True)
    started = time.perf_counter()
    key = _catalog_key(data, limit)
    _banner(f"1/4 model ({'first ' + str(limit) + ' products' if limit else 'train split'})")
    fingerprint = ensure_model(data, model, limit, key)
    _banner("2/4 index version")
    ensure_index(data, model, root, limit, fingerprint, key)
    _banner("3/4 gRPC server")
    pid = start_server(root, model)
    print(f"serving {root} on {HOST}:{PORT} (pid {pid}, log var/server.log)")
    _banner("4/4 queries over gRPC")
    run_queries(data, limit)
    try:
        url = start_ui(data)
    except SystemExit as exc:  # the gRPC demo stands without the page: say why, go on
        url = None
        print(f"\nwarning: {exc}", file=sys.stderr)
    print(f"\nmain job done in {time.perf_counter() - started:.0f} s. The server"
          f"{' and the search page are' if url else ' is'} still running:")
    if url:
        print(f"  search page: {url}  (ecsearch ui; log var/ui.log)")
    print(f"  .venv/bin/ecsearch query --target {HOST}:{PORT} --text 'women black heels' --top-k 5")
    print(f"  .venv/bin/ecsearch query --target {HOST}:{PORT} --image {data}/images/{pick_photo(data, limit, 'Tshirts')[0]}.jpg")
    print(f"  buf curl --protocol grpc --http2-prior-knowledge --list-methods http://{HOST}:{PORT}")
    print(f"  buf curl --protocol grpc --http2-prior-knowledge -d '{{\"text\": \"red dress\", \"top_k\": 3}}' "
          f"http://{HOST}:{PORT}/ecsearch.v1.SearchService/Search")
    print("Stop both with: make stop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
