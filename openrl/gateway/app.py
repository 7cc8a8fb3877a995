"""The aiohttp gateway, put together: the Tinker HTTP protocol and OpenRL's own routes in
front of the bus.

Every route module registers its own routes, and `make_app` lists them all, in the order the
router tries them; errors become HTTP answers in one middleware (http.errors). Nothing
imports this module but the process that serves it.
"""

from __future__ import annotations

from aiohttp import web

from openrl import metrics
from openrl.bus.client import Bus
from openrl.gateway import audit, auth, billing, catalogue, console, downloads, http, keys, quotas, openai_api, openapi, scoring, service
from openrl.gateway.service import Gateway, GatewayConfig

__all__ = ["GatewayConfig", "make_app"]


def _caller(gw: Gateway, request: web.Request) -> str:
    """The key of a request to either surface: X-API-Key (Tinker), else the OpenAI routes'
    `Authorization: Bearer`."""
    return gw.owner(request) if "X-API-Key" in request.headers else openai_api.bearer_owner(gw, request)


def make_app(cfg: GatewayConfig, bus: Bus) -> web.Application:
    gw = Gateway(cfg, bus)
    cat = catalogue.Catalogue(gw)
    # Outermost first; the admission middleware sees the answers http.errors made (its 429s).
    app = web.Application(client_max_size=cfg.max_body_bytes,
                          middlewares=[metrics.observe_http, gw.admission.middleware(lambda r: _caller(gw, r)), http.errors])
    app["gateway"] = gw  # read by openrl/cli.py; new readers use service.GATEWAY
    service.add_routes(app, gw)  # the Tinker protocol, and the long-poll waiters
    scoring.add_routes(app, gw)  # completions scored by named reward functions
    downloads.add_routes(app, gw, cat)  # signed URLs; before the catalogue's catch-all checkpoint route
    catalogue.add_routes(app, cat)  # the REST catalogue (RestClient, AdminClient) and the TTL reaper
    audit.add_routes(app, gw)  # the audit log
    billing.add_routes(app, gw)  # usage events
    keys.attach(app, gw)  # keys made with `openrl keys`, watched live
    auth.attach(app, gw)  # JWTs: POST auth/token, and the secret that checks them
    quotas.attach(app, gw)  # what each key holds, watched live, for the per-key quotas
    openai_api.add_routes(app, gw, cat)  # the OpenAI-compatible routes, under /v1
    console.add_routes(app, gw, cat)  # the read-only web console, under /console; / points there
    openapi.add_routes(app, http.API)  # last: it lists every route above
    return app
