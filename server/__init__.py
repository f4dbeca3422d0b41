"""The ecsearch gRPC query server (``ecsearch serve``) and its client (``ecsearch query``).

Modules: ``service`` (the ``ecsearch.v1.SearchService`` handlers), ``batching`` (micro-batcher
in front of the query tower), ``index_holder`` (current index version, leases, hot swap),
``filters`` (metadata filters and filtered top_k search), ``metrics`` (Prometheus),
``app`` (server assembly: health, reflection, TLS, signals), ``client`` (Python client).
Wire contract: ``proto/ecsearch/v1/search.proto``; stubs in ``server/gen`` (``make proto``).
"""
