"""Retrieval building blocks shared by the indexer, the server and the evaluation: the BM25
lexical index over product text (``engine.retrieval.lexical``) and the fusion of rankings
(``engine.retrieval.fusion``). Imports no job code (indexer, server, training, evaluation)."""
