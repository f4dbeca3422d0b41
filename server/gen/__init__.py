"""Python stubs generated from proto/ by grpcio-tools (``make proto``). Do not edit by hand.

The proto tree is mapped to the virtual path ``server/gen`` (``-Iserver/gen=proto``) so the
generated imports read ``from server.gen.ecsearch.v1 import search_pb2``.
"""
