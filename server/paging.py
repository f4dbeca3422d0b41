"""Page tokens of ``Search`` (AIP-158 pagination): opaque, bound to one index version and
one query.

A token is the URL-safe base64 of a small JSON object: the index version that served the
page, a 16-hex-digit sha256 prefix of the request with ``page_size`` and ``page_token``
cleared (so a token cannot be replayed with another query; the page size may change between
pages, as AIP-158 allows) and the offset of the next hit. Every page recomputes the same
ranked list (same version, same query, same depth ``top_k``) and returns a window of it, so
the pages concatenate to the single-request list. A token from another index version (the
served version was hot-swapped since the first page) is refused: the list may have changed,
and the client must start again. Not signed: it is a position, not a credential. Source:
our choice, after Google AIP-158.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json

from server.gen.ecsearch.v1 import search_pb2

TOKEN_FORMAT = 1


class PageTokenError(ValueError):
    """A page token is malformed, from another index version, or for another query. Mapped to INVALID_ARGUMENT."""


def query_fingerprint(request: search_pb2.SearchRequest) -> str:
    """16 hex digits identifying ``request`` apart from its paging fields (deterministic serialization)."""
    query = search_pb2.SearchRequest()
    query.CopyFrom(request)
    query.ClearField("page_size")
    query.ClearField("page_token")
    return hashlib.sha256(query.SerializeToString(deterministic=True)).hexdigest()[:16]


def encode_page_token(version: str, fingerprint: str, offset: int) -> str:
    """The token of the page starting at hit ``offset`` (0-based) of this query on ``version``."""
    body = json.dumps({"f": TOKEN_FORMAT, "v": version, "q": fingerprint, "o": int(offset)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode("utf-8")).decode("ascii").rstrip("=")


def decode_page_token(token: str, version: str, fingerprint: str, top_k: int) -> int:
    """The offset a token points at, after checking it belongs to this version and query.

    Raises:
        PageTokenError: malformed token, another index version, another query, or an offset
            outside [1, top_k).
    """
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw.decode("utf-8"))
        made_for, issued_by, offset = body["q"], body["v"], body["o"]
        if body.get("f") != TOKEN_FORMAT or not isinstance(offset, int) or isinstance(offset, bool):
            raise ValueError("unknown token format")
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise PageTokenError("page_token is malformed: pass the next_page_token of the previous response "
                             f"unchanged ({type(exc).__name__})") from exc
    if issued_by != version:
        raise PageTokenError(f"page_token was issued by index version {issued_by}, but index version {version} "
                             "now serves: the result list may have changed; search again without a page_token")
    if made_for != fingerprint:
        raise PageTokenError("page_token was issued for another query: every field but page_size must be the "
                             "same as in the request that returned it")
    if not 1 <= offset < top_k:
        raise PageTokenError(f"page_token points at hit {offset}, outside [1, {top_k}) of this query")
    return offset
