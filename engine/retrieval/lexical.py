"""BM25 over product text (title + attribute values), on the bm25s engine.

One document per product: its title followed by its catalogue attribute values in key order
(``product_text``: "Puma Men Black Sports Shoes Men Footwear Shoes Sports Shoes Black ...").
Tokens: bm25s's tokenizer (lower-cased words of 2+ word characters, English stopwords
removed, no stemming); a query is tokenised by ``query_tokens``, the same rule without
bm25s's per-call set-up (5 µs instead of 0.18 ms; tested equal on the catalogue's texts).
Scores: BM25 as Lucene computes it, k1 = 1.5, b = 0.75 (bm25s's defaults; Robertson &
Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009, eq. 3.15 with
Lucene's idf). A product that shares no token with the query scores 0
and is not a lexical hit. The index is written into the index version by
``indexer.lexical`` and read back memory-mapped. Source: bm25s (Lù, 2024,
arXiv:2407.03618); document text and tokenizer options our choice.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Mapping, Sequence

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

K1 = 1.5
B = 0.75
STOPWORDS = "en"
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")  # bm25s.tokenize's default token_pattern
_STOPWORD_SET = frozenset(STOPWORDS_EN)  # what bm25s uses for stopwords="en"
# A token found in more than 1 / DENSE_SHARE of the documents is added to a query's scores as a
# dense row of n_docs floats, made on first use and kept while the rows take at most
# DENSE_ROWS_BYTES: a scatter-add costs ~13 ns a posting, a dense add well under 1 ns a document
# (fashion index: "men", 7,010 postings of 11,882 documents). The sums are the same floats
# (adding 0 changes nothing). Our choice.
DENSE_SHARE = 32
DENSE_ROWS_BYTES = 64 << 20


def product_text(title: str | None, attributes: Mapping[str, object] | None) -> str:
    """The lexical document of a product: its title, then its attribute values (keys sorted;
    empty and ``"NA"`` values left out), space-separated."""
    values = [str(attributes[key]) for key in sorted(attributes or {})
              if attributes[key] not in (None, "", "NA")]
    return " ".join([title or "", *values]).strip()


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """Token lists of ``texts`` (module docstring); an empty list for a text with no token."""
    if not texts:
        return []
    return bm25s.tokenize(list(texts), lower=True, stopwords=STOPWORDS, return_ids=False,
                          show_progress=False)


def query_tokens(text: str) -> list[str]:
    """The tokens of one text, as ``tokenize([text])[0]`` makes them."""
    return [token for token in TOKEN_PATTERN.findall(text.lower()) if token not in _STOPWORD_SET]


class LexicalIndex:
    """A BM25 index over ``n_docs`` documents; document i = internal id i. Thread-safe for
    searching (read-only arrays). Build with ``build``, write with ``save``, read with ``load``."""

    def __init__(self, bm25: "bm25s.BM25"):
        self._bm25 = bm25
        self.n_docs = int(bm25.scores["num_docs"])
        # plain ndarray views of bm25s's (memory-mapped) postings: numpy.memmap indexing is slower
        self._postings = tuple(np.asarray(bm25.scores[name]) for name in ("data", "indices", "indptr"))
        self._dense_rows: dict[int, np.ndarray] = {}
        self._dense_lock = threading.Lock()

    @classmethod
    def build(cls, texts: Sequence[str]) -> "LexicalIndex":
        """Index ``texts`` (document i = ``texts[i]``). Raises ValueError when no text has a token."""
        tokens = tokenize(texts)
        if not any(tokens):
            raise ValueError(f"no document of {len(texts)} has a token to index")
        bm25 = bm25s.BM25(k1=K1, b=B)
        bm25.index(tokens, show_progress=False)
        if int(bm25.scores["num_docs"]) != len(texts):
            raise ValueError(f"bm25s indexed {bm25.scores['num_docs']} documents of {len(texts)}")
        return cls(bm25)

    def save(self, folder: Path) -> list[str]:
        """Write the index files into ``folder`` (created); returns their names, sorted."""
        folder.mkdir(parents=True, exist_ok=True)
        self._bm25.save(str(folder), show_progress=False)
        return sorted(p.name for p in folder.iterdir() if p.is_file())

    @classmethod
    def load(cls, folder: Path, *, mmap: bool = True) -> "LexicalIndex":
        """Read an index written by ``save`` (arrays memory-mapped when ``mmap``).
        Raises OSError / ValueError from bm25s on missing or unreadable files."""
        return cls(bm25s.BM25.load(str(folder), mmap=mmap, show_progress=False))

    def scores(self, text: str) -> np.ndarray:
        """``float32 (n_docs,)`` BM25 scores of every document for ``text`` (0: no shared token)."""
        scores = np.zeros(self.n_docs, dtype=np.float32)
        data, indices, indptr = self._postings
        # bm25s's get_scores_from_ids, token by token in query order (the same float32 sums);
        # a token's postings name each document once, so a fancy-indexed add is np.add.at's
        for token in self._bm25.get_tokens_ids(query_tokens(text)):
            start, end = int(indptr[token]), int(indptr[token + 1])
            row = self._dense_row(token, start, end) if (end - start) * DENSE_SHARE > self.n_docs else None
            if row is not None:
                scores += row
            else:
                scores[indices[start:end]] += data[start:end]
        return scores

    def _dense_row(self, token: int, start: int, end: int) -> np.ndarray | None:
        """The token's scores as ``float32 (n_docs,)`` (0 where absent), or None past the budget."""
        row = self._dense_rows.get(token)
        if row is not None:
            return row
        with self._dense_lock:
            if token not in self._dense_rows:
                if (len(self._dense_rows) + 1) * self.n_docs * 4 > DENSE_ROWS_BYTES:
                    return None
                row = np.zeros(self.n_docs, dtype=np.float32)
                row[self._postings[1][start:end]] = self._postings[0][start:end]
                row.setflags(write=False)
                self._dense_rows[token] = row
            return self._dense_rows[token]

    def search(self, text: str, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` lexical hits of ``text`` among ``allowed`` (int64 internal ids; None:
        all documents). Returns ``(scores float32 (m,), ids int64 (m,))``, m <= k: documents
        with a score > 0 only, best first, ties by ascending id (deterministic)."""
        scores = self.scores(text)
        if allowed is not None:
            ids = np.asarray(allowed, dtype=np.int64)
            ids = ids[(ids >= 0) & (ids < self.n_docs)]
            candidates = ids[scores[ids] > 0]
        elif 0 < k < self.n_docs:  # the k-th best score first: only documents at or above it are sorted
            cut = scores[np.argpartition(scores, self.n_docs - k)[self.n_docs - k:]].min()
            candidates = np.flatnonzero(scores >= cut if cut > 0 else scores > 0).astype(np.int64)
        else:
            candidates = np.flatnonzero(scores > 0).astype(np.int64)
        return top_k_by_score(candidates, scores[candidates], k)


def top_k_by_score(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of ``ids`` by ``scores`` (descending; ties by ascending id):
    ``(scores float32 (m,), ids int64 (m,))``, m = min(k, len(ids))."""
    if ids.size > k:
        keep = np.argpartition(-scores, k - 1)[:k]
        cut = scores[keep].min()  # keep every tie of the k-th score, then order and cut
        keep = np.flatnonzero(scores >= cut)
        ids, scores = ids[keep], scores[keep]
    order = np.lexsort((ids, -scores))[:k]
    return scores[order].astype(np.float32), ids[order].astype(np.int64)
