"""The search page's web app (Starlette): the page, a JSON search / product API over the gRPC
server, and catalogue photos.

Routes:
    ``GET /``                     the page (``static/index.html``)
    ``GET /static/...``           its script and style sheet
    ``POST /api/search``          multipart form ``text``, ``image`` (file), ``top_k``, ``filters``
                                  (JSON) → hits, facets, index version, timings (``search_api``)
    ``GET /api/products/{id}``    GetProducts → the product's record (the detail view)
    ``GET /images/{path}``        a photo inside the catalogue's image folder, else 404
    ``GET /healthz``              ``ok`` (the web app is up; says nothing about the gRPC server)

Errors are JSON ``{"error": "<one readable line>"}`` with a 4xx / 5xx status. Source: our choice
(issue 17).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import grpc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.client import SearchClient
from server.ui.images import contained_file
from server.ui.search_api import QueryError, parse_query, products_json, rpc_error, search_json

STATIC = Path(__file__).resolve().parent / "static"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024  # the server's default --max-receive-bytes


class SearchPage:
    """The routes' state: one gRPC client, the target it talks to and the image folder.

    Args:
        target: the gRPC server, ``HOST:PORT``.
        images: folder photos are served from (``images.image_folder``), or None for no photos.
        timeout_s: deadline of each gRPC call in seconds.
    """

    def __init__(self, target: str, images: Path | None, timeout_s: float = 30.0):
        self.target = target
        self.images = images.resolve() if images is not None else None
        self.client = SearchClient(target, timeout_s=timeout_s)

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def search(self, request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=8)
        except (HTTPException, MultiPartException) as exc:  # malformed body: the parser's message
            return _error(400, f"could not read the form: {getattr(exc, 'detail', None) or exc}")
        upload = form.get("image")
        if upload not in (None, "") and not isinstance(upload, UploadFile):
            return _error(400, "image must be an uploaded file (multipart/form-data)")
        image = await upload.read(MAX_UPLOAD_BYTES + 1) if isinstance(upload, UploadFile) else b""
        if len(image) > MAX_UPLOAD_BYTES:
            return _error(413, f"the photo is over {MAX_UPLOAD_BYTES // 2**20} MiB")
        fields = {name: form.get(name) for name in ("text", "top_k", "filters")}
        if any(isinstance(value, UploadFile) for value in fields.values()):
            return _error(400, "text, top_k and filters must be plain form fields, not files")
        try:
            query = parse_query(fields["text"], image, fields["top_k"], fields["filters"])
        except QueryError as exc:
            return _error(400, str(exc))
        try:
            response = await run_in_threadpool(self.client.search, text=query.text, image=query.image,
                                               top_k=query.pool, filters=query.filters)
        except grpc.RpcError as exc:
            return _error(*rpc_error(exc, self.target))
        return JSONResponse(search_json(response, query, self.images))

    async def product(self, request: Request) -> Response:
        product_id = request.path_params["product_id"]
        try:
            response = await run_in_threadpool(self.client.get_products, [product_id])
        except grpc.RpcError as exc:
            return _error(*rpc_error(exc, self.target))
        if not response.products:
            return _error(404, f"no product {product_id!r} in index version {response.index_version}")
        return JSONResponse(products_json(response, self.images))

    async def image(self, request: Request) -> Response:
        path = contained_file(self.images, request.path_params["path"])
        if path is None:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok")

    def close(self) -> None:
        self.client.close()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(target: str, images: Path | None, timeout_s: float = 30.0) -> Starlette:
    """The Starlette app of the page for the gRPC server at ``target`` (see the module doc);
    its gRPC channel closes when the app shuts down."""
    page = SearchPage(target, images, timeout_s)
    routes = [Route("/", page.page), Route("/healthz", page.healthz),
              Route("/api/search", page.search, methods=["POST"]),
              Route("/api/products/{product_id}", page.product),
              Route("/images/{path:path}", page.image),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        page.close()
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.page = page
    return app
