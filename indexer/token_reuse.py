"""Item vectors from backbone tokens that a token cache already holds (``ecsearch index --token-cache DIR``).

Training caches the frozen backbones' tokens of the train split (``engine.tokens.cache``);
an index build over the whole catalogue would otherwise run the backbones again on the same
titles and photos. ``TokenReuse`` finds a product's title and photo in the cache
(``engine.tokens.lookup.TokenLookup``: same backbone fingerprints, preprocessing and
max_length; a photo only while its size and mtime, or its size and bytes, are unchanged) and, when every modality
the view needs is there, runs only the item tower's fusion encoder on the cached tokens.
Everything else (products the cache does not hold, photos that failed to decode there,
changed photos) goes through the backbones as before.

Agreement with a fresh encode: the cached tokens are float16, so a vector differs from the
one ``item_tower.encode`` returns by that rounding only. Measured over 400 real fashion
train products with the default backbones (all-MiniLM-L6-v2 + EfficientNet-Lite0, untrained
fusion, fused view, fp32, AVX2 emulation): cosine min 0.9999999, max abs difference 3.1e-5
(indexer/README.md); tests/test_token_reuse.py checks >= 0.999 with tiny random backbones,
fp32 and bf16. Source: our choice.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from engine.tokens.lookup import TokenLookup, gather_entries

class TokenReuse:
    """Cached-token encoding for one index build.

    model: ``TwoTowerModel``; root: token cache root; precision: "fp32" | "bf16" (the fusion encoder runs under the same autocast as
    ``Tower.encode``). ``lookup`` tells which cache folders are used or skipped and why.
    """

    def __init__(self, model, root: str | Path, precision: str):
        self.model = model
        self.precision = precision
        self.lookup = TokenLookup(model.backbones, root)

    def find(self, text: str | None, image: str | None):
        """``(text entry, image entry)`` when every present modality is cached, else None.

        ``text`` / ``image`` are what the view uses (None: not used or not there).
        """
        t = self.lookup.text(text)
        i = self.lookup.image(image)
        if (text is not None and t is None) or (image is not None and i is None) or (t is None and i is None):
            return None
        return t, i

    def encode(self, positions: Sequence[int], texts: Sequence[str | None], images: Sequence[str | None],
               batch_size: int) -> dict[int, np.ndarray]:
        """Vectors ``float32 (d,)`` (unit norm) of the products at ``positions`` found in the
        cache; the others are left out of the result (the caller encodes them)."""
        found = {pos: e for pos in positions if (e := self.find(texts[pos], images[pos])) is not None}
        # batches of one kind (text / image / both), similar text lengths: less padding (our choice)
        order = sorted(found, key=lambda pos: (found[pos][1] is not None, found[pos][0] is not None,
                                              _length(found[pos][0])))
        out: dict[int, np.ndarray] = {}
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            vecs = self._encode_batch([found[pos] for pos in batch])
            out.update(zip(batch, vecs))
        return out

    @torch.inference_mode()
    def _encode_batch(self, entries: list) -> np.ndarray:
        tower = self.model.item_tower
        device = tower.fusion.merge.weight.device
        backbones = self.model.backbones
        tt, tm, has_t = (x.to(device) for x in gather_entries([e[0] for e in entries], backbones.text.hidden_size))
        it, im, has_i = (x.to(device) for x in gather_entries([e[1] for e in entries], backbones.image.hidden_size))
        # one fusion call on what each sample has, as Tower.encode: the view already left out the
        # modality it does not use (its entry is None), so has_text / has_image say the view
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            vecs = tower.encode_tokens(tt, tm, it, im, has_t, has_i).float()
        if self.precision != "fp32":
            vecs = torch.nn.functional.normalize(vecs, dim=-1)  # unit norm in fp32, as Tower.encode
        return vecs.cpu().numpy()


def _length(entry) -> int:
    return 0 if entry is None else int(entry[0].lengths[entry[1]])
