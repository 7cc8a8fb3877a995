"""The gateway's OpenAPI document, built from its router: every route it serves is in it
(nothing to keep in sync by hand), with the handler's docstring as its summary, the auth
it needs and the error shape every 4xx/5xx shares. Served at `GET /api/v1/openapi.json`.
Sub-applications are not: the web console (gateway/console.py) is pages for a browser, not API.
"""

from __future__ import annotations

import inspect
import re

from aiohttp import web
from aiohttp.web_urldispatcher import PrefixedSubAppResource

import openrl

# Routes whose body may be protobuf (optionally zstd-compressed) besides JSON.
PROTOBUF_BODIES = ("/forward_backward", "/forward")
PUBLIC = ("/healthz", "/openapi.json")  # served without an API key

_ERROR = {
    "type": "object",
    "required": ["detail", "type"],
    "properties": {
        "detail": {"type": "string", "description": "what was wrong, for a person"},
        "type": {"type": "string", "enum": ["unauthorized", "not_found", "invalid_request", "forbidden", "unavailable", "http_error", "internal"]},
    },
}


def _summary(handler) -> str:
    fn = getattr(handler, "__func__", handler)
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n\n")[0].replace("\n", " ") or fn.__name__.replace("_", " ")


def document(app: web.Application) -> dict:
    paths: dict[str, dict] = {}
    routes = [route for resource in app.router.resources() if not isinstance(resource, PrefixedSubAppResource) for route in resource]
    for route in routes:
        if route.method in ("HEAD", "OPTIONS", "*"):
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if not path:
            continue
        op: dict = {
            "operationId": getattr(route.handler, "__name__", str(route.handler)),
            "summary": _summary(route.handler),
            "responses": {
                "200": {"description": "OK (JSON, or protobuf where the client asked for it)"},
                "4XX": {"description": "a client error; nothing changed", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
                "503": {"description": "no worker yet, or the bus is reconnecting: retry", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in re.findall(r"{(\w+)}", path)]
        if params:
            op["parameters"] = params
        if route.method in ("POST", "PUT", "PATCH"):
            content = {"application/json": {"schema": {"type": "object"}}}
            if path.endswith(PROTOBUF_BODIES):
                content["application/x-protobuf"] = {"schema": {"type": "string", "format": "binary"}}
            op["requestBody"] = {"required": False, "content": content}
        if not path.endswith(PUBLIC):
            op["security"] = [{"apiKey": []}]
        paths.setdefault(path, {})[route.method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "OpenRL gateway",
            "version": openrl.__version__,
            "description": "The Tinker HTTP protocol (as the tinker SDK speaks it) plus OpenRL's scoring and catalogue routes.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
    }


def add_routes(app: web.Application, prefix: str) -> None:
    cache: dict = {}

    async def openapi(request: web.Request) -> web.Response:
        """This document."""
        if "doc" not in cache:  # the router is frozen once the app runs
            cache["doc"] = document(request.app)
        return web.json_response(cache["doc"])

    app.router.add_get(f"{prefix}/openapi.json", openapi)
