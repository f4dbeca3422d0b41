"""The query tower's distilled text encoder: fewer Transformer layers for text-only queries.

A text-only query spends most of its CPU time in the text backbone (all-MiniLM-L6-v2: six
layers, about 90 % of the query tower's arithmetic). ``TextStudent`` holds copies of some of
the backbone's layers (by default the first and the last: layers 0 and 5 of six); the query tower runs
text-only batches through the backbone's embeddings and these layers only, then its own fusion
encoder as before. The layers are distilled after training so that the query tower's text-only
vectors match what the full backbone gives (``engine.training.distill``); the item tower, the
photo path and the text + photo path keep the full backbone, so item vectors and every ranking
of a query with a photo are unchanged. Source: our choice (issue 11: the CPU cost of a text
query); students initialised from a subset of the teacher's layers as in DistilBERT
(Sanh et al., 2019, §3), which takes every other layer.
"""
from __future__ import annotations

import copy
from typing import Sequence

from torch import nn


class TextStudentError(ValueError):
    """The text backbone has no layer stack to take a student from, or bad layer indices."""


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(attribute name, layers)`` of a Hugging Face text encoder's Transformer layers:
    ``model.encoder.layer`` (BERT family) or ``model.encoder.layers`` (CLIP text model).

    Raises:
        TextStudentError: the model has neither.
    """
    encoder = getattr(model, "encoder", None)
    for name in ("layer", "layers"):
        layers = getattr(encoder, name, None)
        if isinstance(layers, nn.ModuleList):
            return name, layers
    raise TextStudentError(f"{type(model).__name__} has no encoder.layer / encoder.layers stack to distil from")


def first_and_last_layer(model: nn.Module) -> list[int]:
    """Layers ``[0, n - 1]`` of ``model``'s n-layer stack: the default student (our choice: on
    all-MiniLM-L6-v2 its text-only vectors reached a held-out cosine of 0.986 to the full
    backbone's, against 0.979 for layers 0, 2, 4, in a third of the layers; docs/results.md)."""
    count = len(layer_stack(model)[1])
    return [0, count - 1] if count > 1 else [0]


def check_layers(keep: Sequence[int], available: int | None) -> list[int]:
    """``keep`` as a list, checked: non-empty, ascending, distinct, each in ``[0, available)``
    (``available`` None: the backbone is not known yet, only ``>= 0`` is checked).

    Raises:
        TextStudentError: otherwise, naming the bad value.
    """
    keep = [int(i) for i in keep]
    if not keep:
        raise TextStudentError("a text student needs at least one layer")
    if any(b <= a for a, b in zip(keep, keep[1:])):
        raise TextStudentError(f"student layers must be distinct and ascending, got {keep}")
    if keep[0] < 0:
        raise TextStudentError(f"student layers must be layer indices >= 0, got {keep}")
    if available is not None and keep[-1] >= available:
        raise TextStudentError(f"student layers must lie in 0..{available - 1} (the backbone has {available}), "
                               f"got {keep}")
    return keep


class TextStudent(nn.Module):
    """Copies of the layers ``keep`` of a text encoder's stack (trainable, saved with the tower).

    ``over(teacher)`` gives a model that runs ``teacher``'s embeddings (shared, not copied) and
    these layers: called like the teacher (``input_ids``, ``attention_mask``), returns its
    output with ``last_hidden_state float (B, L, H)``.

    Raises (constructor):
        TextStudentError: no layer stack, or bad ``keep``.
    """

    def __init__(self, teacher: nn.Module, keep: Sequence[int]):
        super().__init__()
        _, layers = layer_stack(teacher)
        self.keep = tuple(check_layers(keep, len(layers)))
        self.layers = nn.ModuleList(copy.deepcopy(layers[i]) for i in self.keep)
        self._views: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(teacher) -> (teacher, view)

    def over(self, teacher: nn.Module) -> nn.Module:
        """``teacher`` with its layer stack replaced by this student's layers; one shallow copy
        per teacher object (the teacher itself is left as it was)."""
        cached = self._views.get(id(teacher))
        if cached is not None and cached[0] is teacher:
            return cached[1]
        name, _ = layer_stack(teacher)
        view = copy.copy(teacher)
        view._modules = dict(teacher._modules)
        encoder = copy.copy(teacher.encoder)
        encoder._modules = dict(teacher.encoder._modules)
        encoder._modules[name] = self.layers
        view._modules["encoder"] = encoder
        self._views = {id(teacher): (teacher, view)}
        return view

    def __deepcopy__(self, memo):
        clone = TextStudent.__new__(TextStudent)
        nn.Module.__init__(clone)
        clone.keep = self.keep
        clone.layers = copy.deepcopy(self.layers, memo)
        clone._views = {}
        return clone
