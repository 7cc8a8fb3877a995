"""The read-only web console: what one API key has (training runs with their loss curves and
per-step metrics, checkpoints, samplers) and what the stack is doing (workers, reward workers,
queue depths), as server-rendered pages (jinja2 templates in console/, a stylesheet and a little
plain JavaScript, an inline SVG curve; no build step, nothing fetched from elsewhere).

    GET  /                      302 to /console
    GET  /console               the signed-in key's runs, checkpoints and samplers; the stack
    GET  /console/runs/{run}    one run: its loss curve, per-step metrics and checkpoints
    GET  /console/sign-in       the sign-in form
    POST /console/sign-in       api_key, csrf   -> the session cookie, 303 to /console
    POST /console/sign-out      csrf            -> the cookie cleared, 303 to the form
    GET  /console/static/{name} console.css, console.js

Nothing here changes anything: there is no write route, and the pages only read the records the
stack keeps (the catalogue's buckets, the usage log, worker heartbeats, stream and consumer info).

Sign-in: the key is posted once, in a form, and never kept: the session cookie is a signed token
naming the key's id (auth.issue, with a secret derived from the gateway's JWT secret for this one
purpose, so the cookie is not an API credential), HttpOnly, SameSite=Strict, Path=/console, Secure
behind HTTPS, for 8 hours. The key is checked on every page as on every API call, so revoking it
ends its sessions. Any replica accepts any replica's cookie (the secret is shared through KV).
Forms carry a CSRF token that must equal a cookie of the same name (double submit), and a
cross-origin Origin header is refused. A wrong key gets the form back with an error; an unknown or
another key's run is a 404 page: it does not exist for you.

Per-step metrics come from the usage log (OPENRL_USAGE, `UsageRecord`): the trainer appends one
record per forward_backward (its loss:sum and tokens:sum) and per optim_step (grad_norm:mean,
learning_rate:mean). A step ends at an optim_step; its loss is the sum of its passes' loss:sum
over the sum of their tokens:sum. The log is read whole for the key (one direct get per record),
fine for thousands of records.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import structlog
from aiohttp import web

from openrl.bus import subjects
from openrl.bus.errors import NotFound, Unavailable
from openrl.bus.messages import ModelRecord, SamplerRecord, UsageRecord, WeightsRecord
from openrl.gateway import auth
from openrl.gateway.audit import read_log
from openrl.gateway.catalogue import CHECKPOINT_TYPE, Catalogue
from openrl.gateway.http import BUS_UNAVAILABLE, InvalidToken, key_id
from openrl.gateway.names import check_id
from openrl.gateway.service import Gateway

log = structlog.get_logger(__name__)

ROOT = "/console"
HERE = Path(__file__).with_name("console")
SESSION_COOKIE = "openrl_console"
CSRF_COOKIE = "openrl_console_csrf"
SESSION_TTL_S = 8 * 3600
MAX_FORM_BYTES = 4096
MAX_KEY_CHARS = 512
MAX_STEP_ROWS = 500  # the per-step table's newest rows; the curve has every step
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
QUEUES = (subjects.TRAIN_STREAM, subjects.CREATE_STREAM, subjects.SAMPLE_STREAM, subjects.REWARD_STREAM, subjects.DLQ_STREAM)
# No inline script or style anywhere: scripts and styles come from /console/static only.
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# -- what a page shows ----------------------------------------------------------------------


@dataclass
class Step:
    """One optimizer step of a run: the forward_backward passes since the previous optim_step,
    and the optim_step that ended it (None for passes not yet followed by one)."""

    number: int
    loss_sum: float = 0.0
    loss_tokens: float = 0.0
    tokens: int = 0  # tokens through forward_backward (every datum token)
    passes: int = 0
    seconds: float = 0.0
    at: float = 0.0
    optim: dict[str, float] | None = None
    extra: dict[str, float] = field(default_factory=dict)  # other summed pass metrics

    @property
    def loss(self) -> float | None:
        return self.loss_sum / self.loss_tokens if self.loss_tokens > 0 else None


@dataclass
class RunHistory:
    steps: list[Step] = field(default_factory=list)  # optimizer steps, then at most one open one
    tokens: int = 0
    forward_passes: int = 0  # forward-only (evaluation) passes
    last_at: float = 0.0

    @property
    def completed(self) -> int:
        return sum(1 for s in self.steps if s.optim is not None)


def histories(records: list[UsageRecord]) -> dict[str, RunHistory]:
    """Each run's steps, from its training usage records (deduplicated by request id, as billing
    does: a trainer replaying its log after a crash writes a request's record again)."""
    seen: set[str] = set()
    by_run: dict[str, list[UsageRecord]] = {}
    for r in records:
        if r.kind != "training" or not r.model_id or (r.request_id and r.request_id in seen):
            continue
        seen.add(r.request_id)
        by_run.setdefault(r.model_id, []).append(r)
    out: dict[str, RunHistory] = {}
    for run, recs in by_run.items():
        recs.sort(key=lambda r: (r.seq_id, r.at))
        h = RunHistory()
        open_: Step | None = None
        for r in recs:
            h.last_at = max(h.last_at, r.at)
            if r.call == "forward":
                h.forward_passes += 1
                continue
            if open_ is None:
                open_ = Step(number=len(h.steps) + 1)
                h.steps.append(open_)
            open_.seconds += r.seconds
            open_.at = max(open_.at, r.at)
            if r.call == "optim_step":
                open_.optim = dict(r.metrics)
                open_ = None
                continue
            # forward_backward, or "" (an older trainer's record: tokens, no metrics)
            open_.passes += 1
            open_.tokens += r.tokens
            h.tokens += r.tokens
            for name, value in r.metrics.items():
                if name == "loss:sum":
                    open_.loss_sum += value
                elif name == "tokens:sum":
                    open_.loss_tokens += value
                else:
                    open_.extra[name] = open_.extra.get(name, 0.0) + value
        if open_ is not None and open_.passes == 0:
            h.steps.pop()
        out[run] = h
    return out


def curve(steps: list[Step], width: int = 720, height: int = 260) -> dict[str, Any] | None:
    """An SVG path of the steps' losses (x: step, y: loss per token), with axis labels."""
    points = [(s.number, s.loss) for s in steps if s.loss is not None and math.isfinite(s.loss)]
    if not points:
        return None
    left, right, top, bottom = 64, 16, 16, 36
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right), top + (y1 - y) / (y1 - y0) * (height - top - bottom))

    placed = [(n, loss, *at(n, loss)) for n, loss in points]
    d = " ".join(f"{'M' if i == 0 else 'L'}{px:.1f},{py:.1f}" for i, (_, _, px, py) in enumerate(placed))
    return {
        "width": width, "height": height, "d": d, "left": left, "top": top, "bottom": height - bottom, "right": width - right,
        "points": [{"step": n, "loss": loss, "x": round(px, 1), "y": round(py, 1)} for n, loss, px, py in placed],
        "y_max": y1, "y_min": y0, "x_min": x0, "x_max": x1,
    }  # fmt: skip


# -- formatting, for the templates -----------------------------------------------------------


def _when(t: float | None) -> str:
    if not t:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0.0, time.time() - t)
    if s < 120:
        return f"{s:.0f} s ago"
    if s < 7200:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.0f} days ago"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _number(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return f"{x:.{digits}g}"


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE), autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(when=_when, ago=_ago, size=_size, number=_number)
    return env


# -- the console ------------------------------------------------------------------------------


class Console:
    def __init__(self, gw: Gateway, cat: Catalogue):
        self.gw = gw
        self.cat = cat
        self.bus = gw.bus
        self.env = _templates()
        self.static = {name: ((HERE / name).read_bytes(), kind) for name, kind in STATIC.items()}

    # -- sessions

    def _secret(self) -> bytes:
        if self.gw.jwt_secret is None:
            raise Unavailable("the gateway is starting; retry in a moment")
        return hmac.new(self.gw.jwt_secret, b"openrl web console session", hashlib.sha256).digest()

    def _known(self, kid: str) -> bool:
        return kid in self.gw.keys or kid in self.gw.live_keys

    def signed_in(self, request: web.Request) -> str | None:
        """The key id of a valid session cookie whose key is still live; None otherwise."""
        token = request.cookies.get(SESSION_COOKIE, "")
        if not token:
            return None
        try:
            kid = auth.verify(token, self._secret())
        except (InvalidToken, Unavailable):
            return None
        return kid if self._known(kid) else None

    @staticmethod
    def _secure(request: web.Request) -> bool:
        return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"

    def _csrf(self, request: web.Request, response: web.Response) -> str:
        """The request's CSRF token, set as a cookie first if it had none."""
        token = request.cookies.get(CSRF_COOKIE, "")
        if len(token) != 43:
            token = secrets.token_urlsafe(32)
            response.set_cookie(CSRF_COOKIE, token, path=ROOT, httponly=True, samesite="Strict", secure=self._secure(request))
        return token

    def _form_ok(self, request: web.Request, form) -> bool:
        """The form's CSRF token matches its cookie, and it comes from this origin."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and origin.rstrip("/") != f"{request.scheme}://{request.host}":
            forwarded = request.headers.get("X-Forwarded-Proto")
            if not forwarded or origin.rstrip("/") != f"{forwarded}://{request.host}":
                return False
        cookie, sent = request.cookies.get(CSRF_COOKIE, ""), form.get("csrf", "")
        return bool(cookie) and isinstance(sent, str) and hmac.compare_digest(cookie.encode(), sent.encode("utf-8", "replace"))

    # -- rendering

    def page(self, request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
        response = web.Response(status=status, content_type="text/html", charset="utf-8")
        context.setdefault("key", None)
        context["csrf"] = self._csrf(request, response)
        context["root"] = ROOT
        context["status"] = status
        response.text = self.env.get_template(template).render(**context)
        return response

    # -- routes

    async def index(self, request: web.Request) -> web.Response:
        """Point / at the web console."""
        raise web.HTTPFound(ROOT)

    async def sign_in_form(self, request: web.Request) -> web.Response:
        if self.signed_in(request):
            raise web.HTTPSeeOther(ROOT)
        return self.page(request, "sign_in.html", error=None)

    async def sign_in(self, request: web.Request) -> web.Response:
        if request.content_length is None or request.content_length > MAX_FORM_BYTES:
            return self.page(request, "sign_in.html", status=413 if request.content_length else 411, error="The form was too large or had no length.")
        if request.content_type not in ("application/x-www-form-urlencoded", "multipart/form-data"):
            return self.page(request, "sign_in.html", status=415, error="Sign in with the form.")
        form = await request.post()
        if not self._form_ok(request, form):
            return self.page(request, "sign_in.html", status=403, error="The form expired or came from another site: sign in again.")
        key = form.get("api_key", "")
        key = key.strip() if isinstance(key, str) else ""
        if not key or len(key) > MAX_KEY_CHARS or not key.isascii() or not key.isprintable() or key.startswith("eyJ"):
            return self.page(request, "sign_in.html", status=400, error="Enter an API key (tml-...).")
        kid = key_id(key)
        if not self._known(kid):
            log.info("console_sign_in_refused")
            return self.page(request, "sign_in.html", status=401, error="That API key is not known here.")
        token = auth.issue(self._secret(), kid, ttl_s=SESSION_TTL_S)
        response = web.HTTPSeeOther(ROOT)
        response.set_cookie(SESSION_COOKIE, token, path=ROOT, max_age=SESSION_TTL_S, httponly=True, samesite="Strict",
                            secure=self._secure(request))  # fmt: skip
        log.info("console_signed_in", owner=kid)
        raise response

    async def sign_out(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
            return self.page(request, "sign_in.html", status=413, error="The form was too large.")
        form = await request.post()
        if not self._form_ok(request, form):
            return self.page(request, "sign_in.html", status=403, error="The form expired or came from another site.")
        response = web.HTTPSeeOther(f"{ROOT}/sign-in")
        response.del_cookie(SESSION_COOKIE, path=ROOT)
        raise response

    async def static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.static:
            raise web.HTTPNotFound()
        body, kind = self.static[name]
        return web.Response(body=body, content_type=kind, headers={"Cache-Control": "max-age=300"})

    def _owner(self, request: web.Request) -> str:
        kid = self.signed_in(request)
        if kid is None:
            raise web.HTTPSeeOther(f"{ROOT}/sign-in")
        return kid

    async def _usage(self, owner: str) -> dict[str, RunHistory]:
        return histories(await read_log(self.bus, subjects.USAGE_STREAM, subjects.usage(owner), UsageRecord))

    async def overview(self, request: web.Request) -> web.Response:
        owner = self._owner(request)
        runs = await self.cat.runs(owner)
        history = await self._usage(owner)
        checkpoints = await self.cat.checkpoints(owner)
        samplers = [s for s in await self.cat.records(self.bus.samplers, SamplerRecord) if s.owner == owner]
        samplers.sort(key=lambda s: (s.created_at, s.sampler_id), reverse=True)
        saved: dict[str, float] = {}
        for c in checkpoints:
            saved[c.model_id] = max(saved.get(c.model_id, 0.0), c.created_at)
        rows = []
        for r in runs:
            h = history.get(r.model_id, RunHistory())
            rows.append({"record": r, "steps": h.completed, "tokens": h.tokens, "last": max(r.created_at, h.last_at, saved.get(r.model_id, 0.0))})
        return self.page(request, "overview.html", key=owner, runs=rows, checkpoints=[_checkpoint(c) for c in checkpoints],
                         samplers=[_sampler(s) for s in samplers], **await self._stack())  # fmt: skip

    async def run(self, request: web.Request) -> web.Response:
        owner = self._owner(request)
        run = request.match_info["run"]
        try:
            check_id(run, "training run id")
            rec = await self.gw.model(run, owner, trainable=False)
        except (NotFound, ValueError):
            return self.page(request, "missing.html", status=404, key=owner, what=f"training run {run[:200]!r}")
        h = (await self._usage(owner)).get(run, RunHistory())
        checkpoints = await self.cat.checkpoints(owner, run=run)
        metric_names = sorted({n for s in h.steps for n in (s.optim or {})} | {n for s in h.steps for n in s.extra})
        return self.page(request, "run.html", key=owner, run=rec, history=h, curve=curve(h.steps), metric_names=metric_names,
                         rows=list(reversed(h.steps))[:MAX_STEP_ROWS], max_rows=MAX_STEP_ROWS,
                         checkpoints=[_checkpoint(c) for c in checkpoints])  # fmt: skip

    async def _stack(self) -> dict[str, Any]:
        workers = sorted(await self.gw.workers(), key=lambda w: (w.kind, w.base_model or w.reward_name, w.worker_id))
        return {"workers": [w for w in workers if w.kind != "rewarder"], "rewarders": [w for w in workers if w.kind == "rewarder"],
                "queues": await self._queues(), "now": time.time()}  # fmt: skip

    async def _queues(self) -> list[dict[str, Any]]:
        """Each work stream's depth and its consumers' backlogs. The per-model consumers of the
        train log are summed into one row: their names carry other keys' run ids."""
        rows = []
        for name in QUEUES:
            try:
                info = await self.bus.js.stream_info(name)
                consumers = [] if name == subjects.DLQ_STREAM else await self.bus.js.consumers_info(name)
            except BUS_UNAVAILABLE:
                raise
            except Exception as e:  # a stream this deployment has not made
                log.debug("console_stream_unreadable", stream=name, error=repr(e))
                continue
            per_model = [c for c in consumers if c.name.startswith("train-")]
            shown = [c for c in consumers if not c.name.startswith("train-")]
            groups = [(c.name, [c]) for c in sorted(shown, key=lambda c: c.name)]
            if per_model:
                groups.append((f"per-run consumers ({len(per_model)})", per_model))
            rows.append({
                "stream": name, "messages": info.state.messages, "bytes": info.state.bytes, "dead_letters": name == subjects.DLQ_STREAM,
                "consumers": [{"name": label, "pending": sum(c.num_pending or 0 for c in cs), "ack_pending": sum(c.num_ack_pending or 0 for c in cs),
                               "redelivered": sum(c.num_redelivered or 0 for c in cs), "waiting": sum(c.num_waiting or 0 for c in cs)}
                              for label, cs in groups],
            })  # fmt: skip
        return rows


def _checkpoint(c: WeightsRecord) -> dict[str, Any]:
    return {"path": c.path, "run": c.model_id, "type": CHECKPOINT_TYPE[c.kind], "name": c.name, "size": c.size_bytes,
            "public": c.public, "created": c.created_at, "expires": c.expires_at}  # fmt: skip


def _sampler(s: SamplerRecord) -> dict[str, Any]:
    if s.model_path:
        weights = s.model_path
    elif s.weights:  # unnamed sampler weights: adapters/<run>/seq-<n>
        weights = f"unnamed sampler weights of {s.weights.split('/')[1] if s.weights.count('/') >= 2 else s.weights}"
    else:
        weights = "the base model"
    return {"id": s.sampler_id, "base_model": s.base_model, "weights": weights, "created": s.created_at}


def add_routes(app: web.Application, gw: Gateway, cat: Catalogue) -> None:
    """The console as a sub-application under /console (so its routes stay out of the API's
    OpenAPI document and its error pages out of the API's JSON errors), and / pointing at it."""
    console = Console(gw, cat)

    @web.middleware
    async def guard(request: web.Request, handler):
        """Security headers on every console answer, and errors as pages rather than JSON."""
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                for name, value in HEADERS.items():
                    e.headers.setdefault(name, value)
                raise
            if e.status == 404:
                what = f"page {request.path[:200]!r}"
            elif e.status == 405:
                what = f"{request.method} is not served here: the console only shows things."
            else:
                what = e.reason
            response = console.page(request, "missing.html", status=e.status, key=console.signed_in(request), what=what)
            if "Allow" in e.headers:  # a 405 says what is allowed
                response.headers["Allow"] = e.headers["Allow"]
        except (Unavailable, *BUS_UNAVAILABLE) as e:
            log.warning("console_unavailable", path=request.path, error=repr(e))
            response = console.page(request, "unavailable.html", status=503)
            response.headers["Retry-After"] = "2"
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    sub = web.Application(middlewares=[guard])
    sub.router.add_get("", console.overview)
    sub.router.add_get("/", console.overview)
    sub.router.add_get("/runs/{run}", console.run)
    sub.router.add_get("/sign-in", console.sign_in_form)
    sub.router.add_post("/sign-in", console.sign_in)
    sub.router.add_post("/sign-out", console.sign_out)
    sub.router.add_get("/static/{name}", console.static_file)
    app.add_subapp(ROOT, sub)
    app.router.add_get("/", console.index)
