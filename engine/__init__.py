"""ecsearch engine: backbones, gated cross-modal fusion, query and item towers, training, evaluation.

Importing ``engine`` (which every entry point does first: the ``ecsearch`` CLI, the indexer,
the server, the tests, the benches) sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment
already sets it: the one place it is set.
"""

import os as _os

# OpenMP threads that spin while waiting make faiss and torch 10-20x slower when the CPU is
# shared with other processes (measured: IVF-PQ training 0.6 s passive vs 10.6 s active on a
# loaded 2-core machine). Must be set before torch's / faiss's OpenMP runtime loads. Our choice.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
