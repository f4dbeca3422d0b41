"""The Ray executor of the index build (``ecsearch index --executor ray [--ray-address ADDR]``).

The same stages as the local executor (``indexer.encode`` / ``indexer.version`` functions),
run on a Ray cluster:

- encode: a Ray Data pipeline over the planned batches (``plan_chunk``: same chunks, same
  length-sorted batches as the local executor) -> ``decode_batch`` in Ray tasks ->
  ``encode_batch`` in an actor pool (``map_batches`` with a callable class: one model per
  actor, loaded once from the model folder; CPU or ``--ray-actor-gpus`` per actor). The
  driver gathers each chunk's batches and writes the chunk (``indexer.chunk_files``; the
  vector shards of the encode stage), so a killed job resumes as the local one does.
- index: IVF-PQ is trained once on a sample in the driver; the per-shard add, the fp16
  vectors, the refine file and the LMDB metadata run as parallel Ray tasks (``run_all``),
  writing into the staging folder; then the driver writes the manifest, checks recall and
  publishes atomically, as the local executor does.

Failures: an actor or task whose worker dies is restarted and its batch retried
(``max_restarts`` / ``max_task_retries`` / ``max_retries``, ``RETRIES``); an image that cannot
be decoded is flagged or rejected by ``decode_batch`` / ``encode_batch`` like locally, never
dropped. On a multi-node cluster the catalogue, the model folder and ROOT must be on a
filesystem every node sees at the same path. Ray is optional: ``pip install 'ecsearch[ray]'``.
Source: Ray Data batch inference (``map_batches`` with an actor pool); wiring our choice.
"""
from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from indexer.encode import EncodeOptions, decode_batch, encode_batch, finish_chunk, plan_chunk
from indexer.item_graphs import use_onnx_graphs
from indexer.errors import BuildError

RETRIES = 3
# CPU shares: an encoder actor 0.75, a decode task 0.25, so that one actor per CPU still leaves
# room for the (light) decode tasks beside them (our choice; the local executor oversubscribes
# the same way: DataLoader workers beside the encoding process).
ACTOR_CPUS = 0.75
DECODE_CPUS = 0.25
# Fault injection for tests: the first encoder actor call to find this file absent creates it
# and kills its own worker process (os._exit), so the retry path runs on a real dead worker.
KILL_ONCE_ENV = "ECSEARCH_RAY_KILL_ONCE"
CODE_ROOT = Path(__file__).resolve().parents[1]


def require_ray():
    """The ``ray`` module; raises BuildError with the install line when Ray is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BuildError(f"--executor ray needs Ray Data, which is not installed ({exc}); "
                         "install it with: pip install 'ecsearch[ray]'") from exc
    return ray


def ray_runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runtime env for ``ray.init``: workers import this checkout of ecsearch (PYTHONPATH)."""
    path = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path, **(extra_env or {})}}


def start_ray(address: str | None = None, num_cpus: int | None = None, extra_env: dict[str, str] | None = None):
    """``ray.init`` for the indexer: workers import this checkout (``ray_runtime_env``) and, on a
    Ray instance this call starts, run at the driver's priority: Ray starts its workers with
    niceness 15 by default (``RAY_worker_niceness``), which on a machine shared with other jobs
    halves the encoder actors' speed or worse (measured here: actors at nice 19 beside nice-5
    jobs). A running cluster keeps its own setting (``RAY_worker_niceness=0 ray start ...``).
    Returns the ``ray`` module. Raises BuildError without Ray."""
    ray = require_ray()
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=address, num_cpus=num_cpus, runtime_env=ray_runtime_env(extra_env), include_dashboard=False,
             log_to_driver=False)
    return ray


def _decode_rows(batch: dict[str, np.ndarray], preprocess: Callable) -> dict[str, np.ndarray]:
    """Ray Data decode stage: one row = one planned batch (pickled); adds the decoded images."""
    payloads = []
    for blob in batch["payload"]:
        item = pickle.loads(blob)
        item["tensors"], item["errors"] = decode_batch(range(len(item["images"])), item["images"], preprocess)
        payloads.append(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
    return {"chunk": batch["chunk"], "payload": np.array(payloads, dtype=object)}


class _Encoder:
    """Ray Data encode stage: one item tower per actor, loaded once from the model folder."""

    def __init__(self, model_dir: str, device: str, options: EncodeOptions, threads: int):
        import torch

        from engine.model.model_folder import load_model

        torch.set_num_threads(max(1, threads))
        self.model = load_model(model_dir, device=device)
        self.options = options
        # the same ONNX Runtime item graphs as the local executor (indexer.item_graphs)
        use_onnx_graphs(self.model, options.view, options.precision, options.token_cache, log=lambda _m: None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        marker = os.environ.get(KILL_ONCE_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # a killed worker: Ray restarts the actor and retries this batch
        out = []
        for blob in batch["payload"]:
            item = pickle.loads(blob)
            outcome = encode_batch(self.model, item["positions"], item["texts"], item["tensors"], item["errors"],
                                   self.options)
            out.append(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
        return {"chunk": batch["chunk"], "payload": np.array(out, dtype=object)}


def _call(fn: Callable, *args) -> Any:
    return fn(*args)


class RayExecutor:
    """Runs the encode stage and the version's parts on Ray (``ray.init(address)`` unless Ray
    is already initialised). actors: encoder actors (default: one per cluster CPU, or one per
    GPU when ``actor_gpus`` > 0); actor_threads: torch threads per actor (default: cluster
    CPUs // actors). Raises BuildError without Ray."""

    def __init__(self, model_dir: Path, device: str, address: str | None = None, actors: int | None = None,
                 actor_gpus: float = 0.0, actor_threads: int | None = None):
        self.ray = require_ray()
        if not self.ray.is_initialized():
            start_ray(address)
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        self.actors = actors or (max(1, gpus) if actor_gpus > 0 else max(1, cpus))
        self.actor_gpus = actor_gpus
        self.actor_threads = actor_threads or max(1, cpus // self.actors)
        self.model_dir, self.device = str(Path(model_dir).resolve()), device

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the executor."""
        return {"executor": "ray", "ray_version": self.ray.__version__, "encode_actors": self.actors,
                "actor_gpus": self.actor_gpus, "actor_threads": self.actor_threads,
                "cluster_cpus": int(self.ray.cluster_resources().get("CPU", 0))}

    def encode_chunks(self, model, products, inputs, todo_chunks, options: EncodeOptions,
                      log: Callable[[str], None]) -> Iterator[tuple[int, np.ndarray, dict]]:
        """``indexer.encode.encode_products``'s chunk executor on Ray Data; yields each chunk
        ``(start, float32 (count, d), info)`` once all its batches are back."""
        if options.token_cache is not None:
            raise BuildError("--token-cache is not supported with --executor ray (use --executor local)")
        texts, images = inputs
        plans = {start: plan_chunk(products, texts, images, start, count, options) for start, count in todo_chunks}
        missing = {start: len(plan.batches) for start, plan in plans.items()}
        for start in [s for s, m in missing.items() if m == 0]:
            yield (start, *finish_chunk(plans.pop(start), texts, images, options.view, int(model.dim)))
        rows = [{"chunk": start, "payload": pickle.dumps({"positions": b, "texts": [texts[p] for p in b],
                                                           "images": [images[p] for p in b]})}
                for start, plan in plans.items() for b in plan.batches]
        if not rows:
            return
        log(f"encode: Ray Data over {len(rows)} batches, {self.actors} encoder actor(s)")
        for start, outcome in self._run_pipeline(rows, model.backbones.image.preprocess, options):
            plans[start].merge(outcome)
            missing[start] -= 1
            if missing[start] == 0:
                yield (start, *finish_chunk(plans.pop(start), texts, images, options.view, int(model.dim)))

    def _run_pipeline(self, rows: list[dict], preprocess: Callable, options: EncodeOptions):
        """read -> decode (tasks) -> encode (actor pool); yields ``(chunk start, BatchOutcome)``."""
        data = self.ray.data
        ds = data.from_items(rows, override_num_blocks=min(len(rows), 200))
        with warnings.catch_warnings():  # retry limits have no named parameter yet (Ray 2.60 warns)
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(_decode_rows, batch_size=1, fn_kwargs={"preprocess": preprocess}, num_cpus=DECODE_CPUS,
                                max_retries=RETRIES)
            ds = ds.map_batches(_Encoder, batch_size=1, concurrency=self.actors, num_cpus=ACTOR_CPUS,
                                num_gpus=self.actor_gpus, max_restarts=RETRIES, max_task_retries=RETRIES,
                                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(self.actor_threads)}},
                                fn_constructor_args=(self.model_dir, self.device, options, self.actor_threads))
        for row in ds.iter_rows():
            yield int(row["chunk"]), pickle.loads(row["payload"])

    def run_all(self, tasks: list[Callable[[], Any]]) -> list:
        """``indexer.version.write_version``'s parts as parallel Ray tasks (one CPU each), in
        order. Large arguments (arrays, lists) are put in the object store once and shared."""
        ray = self.ray
        remote = ray.remote(num_cpus=1, max_retries=RETRIES)(_call)
        shared: dict[int, Any] = {}

        def ref(arg):
            big = isinstance(arg, (np.ndarray, list)) and (getattr(arg, "nbytes", 0) > 1 << 20 or
                                                           isinstance(arg, list))
            if big and id(arg) not in shared:
                shared[id(arg)] = ray.put(arg)
            return shared.get(id(arg), arg) if big else arg

        return ray.get([remote.remote(t.func, *[ref(a) for a in t.args]) for t in tasks])
