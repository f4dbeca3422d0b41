"""The ``ecsearch`` console script: one entry point, one subcommand per job.

Each subcommand lives in the module that owns it and is imported lazily, so ``ecsearch
query`` does not import torch training code. A command module defines
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Our choice: a table, not entry-point plugins.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("engine.training.cli", "train the query and item towers on a catalogue"),
    "distill": ("engine.training.distill_cli", "distil a trained model's text encoder for text-only queries"),
    "eval": ("engine.evaluation.cli", "nine-scenario evaluation of a model on the test split"),
    "index": ("indexer.cli", "encode a catalogue and publish a sharded IVF-PQ index version"),
    "serve": ("server.cli", "serve the current index version over gRPC"),
    "query": ("server.client_cli", "send a query to a running server and print the hits"),
    "ui": ("server.ui.cli", "the search page in the browser, over a running gRPC server"),
}


def _available() -> dict[str, tuple[str, str]]:
    found = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            found[name] = (module, help_text)
    return found


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns its exit status."""
    commands = _available()
    parser = argparse.ArgumentParser(prog="ecsearch", description="multimodal e-commerce search engine")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == chosen:  # import only the command being run (keeps `ecsearch query` light)
            importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
