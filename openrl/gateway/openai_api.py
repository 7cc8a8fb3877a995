"""OpenAI-compatible routes: serve base models and trained sampler weights to the tools people
already evaluate with (the `openai` client, lm-eval's local-completions, chat UIs).

    POST /v1/completions        prompt (text, texts, token ids, lists of token ids) -> text
    POST /v1/chat/completions   messages, through the base model's chat template  -> a message
    GET  /v1/models             the base models served here and the key's sampler weights
    GET  /v1/models/{model}     one of them

`model` is a base model a sampler serves, a `tinker://<run>/sampler_weights/<name>` path, or a
sampling session id (`<session>:sample:<n>`, what `save_weights_and_get_sampling_client` made).
`Authorization: Bearer <API key>` (or X-API-Key) goes through the Tinker routes' own check
(`Gateway.owner`), so the keys and the tenant isolation are theirs: another key's weights are
a 404, as they are to the Tinker routes. Published weights may be sampled by any key.

The gateway tokenizes: it reads the base model's `tokenizer.json`, `tokenizer_config.json` and
chat template from the Hugging Face cache (or the model's folder) with `tokenizers` and jinja2,
never transformers. A request then becomes the same `SampleRequest` an SDK `sample` makes
(`service.sample_fields` builds its fields), queued on the base model's sample stream, and its
future is awaited as a long poll is. The sampler returns a sequence whole, so a streamed answer
sends its role at once and its text when the sample is done (with `: keepalive` comments in
between), in OpenAI's chunk format, ending with `data: [DONE]`.

A client that goes away before its answer frees its request: the future is failed (so a
sampler that takes the request later drops it without computing), the message is deleted
from the sample queue if no sampler has acked it, and a cancel notice (`subjects.cancel`) tells
a sampler already generating it to stop: its engine drops the request's rows at the next step.
A sampler that misses the notice runs it to the end and records nothing (the compare-and-set
on the pending future fails).

Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}, from the same
error classes as every other route. docs/openai.md has the details and examples.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
import structlog
from aiohttp import web
from multidict import CIMultiDict

from openrl.bus import subjects
from openrl.bus.errors import InvalidRequest, NotFound, Unauthorized, Unavailable
from openrl.bus.messages import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, Future, SampleRequest, SampleResult, WorkerInfo, decode
from openrl.gateway import bodies, http
from openrl.gateway.names import check_id
from openrl.gateway.service import Gateway, sample_fields

log = structlog.get_logger(__name__)

MAX_PROMPTS = 64  # prompts in one completions request (each is one sample request)
MAX_N = 128  # choices per prompt (the samplers' num_samples bound)
MAX_SEQUENCES = 256  # prompts x n
MAX_COMPLETION_LOGPROBS = 5  # completions' `logprobs`, as OpenAI's
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs`, as OpenAI's
MAX_STOP = MAX_STOP_STRINGS  # stop strings, each at most MAX_STOP_STRING_CHARS
MAX_MESSAGES = 4096
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
POLL_S = 1.0  # how often a waiting request checks that its client is still there
KEEPALIVE_S = 5.0  # a streamed answer's comment line while the sample runs
CANCELLED = "cancelled: the client disconnected before the answer"

# transformers' default chat template until 4.43 (ChatML): used for a tokenizer without one.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Parameters OpenAI defines that OpenRL cannot honour: accepted only at their neutral value.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "parallel_tool_calls": (),
    "response_format": ({"type": "text"},),
    "store": (False,),
    "metadata": ({},),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop", "seed", "user"}
COMPLETION_PARAMS = COMMON | {"prompt", "logprobs", "echo", "best_of"}
CHAT_PARAMS = COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


# -- errors ------------------------------------------------------------------------------


class BadParam(InvalidRequest):
    """A 400 that names the request field at fault (OpenAI's `param`), and a `code` if any."""

    def __init__(self, message: str, param: str | None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFound(NotFound):
    """404 with OpenAI's code for it."""


class QueueFull(Unavailable):
    """429: the sample queue is over the gateway's bound."""


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# OpenAI's error type and code for each status the gateway's classification (http.ANSWERS) gives.
_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "unavailable"),
}


def _answer(e: BaseException) -> tuple[int, dict[str, Any], dict[str, str] | None]:
    """The status, OpenAI error body and headers for an error raised on purpose: the status is
    the one every route gives (http.ANSWERS), the body OpenAI's."""
    if isinstance(e, QueueFull):
        return 429, error_body(str(e), "rate_limit_error", code="rate_limit_exceeded"), {"Retry-After": "1"}
    status, _, headers = next(http.ANSWERS[cls] for cls in type(e).__mro__ if cls in http.ANSWERS)
    type_, code = _KINDS.get(status, ("invalid_request_error", None))
    if isinstance(e, ModelNotFound):
        return status, error_body(str(e), type_, "model", "model_not_found"), headers
    return status, error_body(str(e), type_, getattr(e, "param", None), getattr(e, "code", None) or code), headers


def bearer_owner(gw: Gateway, request: web.Request) -> str:
    """The caller's key id: `Authorization: Bearer <key>` (or X-API-Key), checked by the
    Tinker routes' own `Gateway.owner`, so both surfaces accept exactly the same keys."""
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if auth and scheme.lower() != "bearer":
        raise Unauthorized("Authorization must be 'Bearer <API key>'")
    token = token.strip() or request.headers.get("X-API-Key", "")
    if not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <API key>'")
    headers = CIMultiDict(request.headers)
    headers["X-API-Key"] = token
    return gw.owner(request.clone(headers=headers))


def _admitted(handler):
    """The request waits for its key's share of the samplers (admission.py) before its body is
    read, and holds its place in flight until it is answered."""

    @functools.wraps(handler)
    async def wrapped(self, request: web.Request) -> web.StreamResponse:
        async with self.gw.admission.admit(self.owner(request), "sample"):
            return await handler(self, request)

    return wrapped


def _openai_errors(handler):
    """Every error of an OpenAI route in OpenAI's shape (http.errors answers the Tinker routes
    in theirs; it only sees what escapes here, which is nothing)."""

    @functools.wraps(handler)
    async def wrapped(self, request: web.Request) -> web.StreamResponse:
        try:
            return await handler(self, request)
        except ClientGone:  # nobody reads this answer; 499 is what the metrics record
            log.info("openai_client_gone", path=request.path)
            return web.Response(status=499)
        except (QueueFull, *http.ANSWERS) as e:
            status, body, headers = _answer(e)
            return http.reply(body, status=status, headers=headers)
        except http.BUS_UNAVAILABLE as e:
            log.warning("bus_unavailable", path=request.path, error=repr(e))
            body = error_body(f"message bus unavailable: {type(e).__name__}; retry shortly", "server_error", code="unavailable")
            return http.reply(body, status=503, headers={"Retry-After": "2"})
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return http.reply(error_body(e.reason if e.text is None else e.text, "invalid_request_error"), status=e.status)
        except Exception:
            error_id = uuid.uuid4().hex[:12]
            log.exception("request_failed", path=request.path, error_id=error_id)
            return http.reply(error_body(f"internal error (id {error_id})", "server_error"), status=500)

    return wrapped


# -- tokenizers --------------------------------------------------------------------------


class TextTokenizer:
    """A base model's tokenizer and chat template, read from its files without transformers."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "special_tokens_map.json")

    def __init__(self, folder: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        config = _read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
        for name in ("chat_template.jinja", "chat_template.json"):  # transformers >= 4.43 keeps it apart
            path = os.path.join(folder, name)
            if os.path.exists(path):
                text = open(path, encoding="utf-8").read()
                template = (json.loads(text) or {}).get("chat_template") if name.endswith(".json") else text
        self.has_chat_template = bool(template)
        # The most characters one token stands for: a text longer than the context times this
        # (twice, for what a normalizer may drop) cannot fit, and is refused before encoding it.
        self.longest = max(map(len, self.tok.get_vocab(with_added_tokens=True)), default=1)
        self.specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(template or FALLBACK_CHAT_TEMPLATE)

    def encode(self, text: str, *, special: bool, context: int = 0, param: str = "prompt") -> list[int]:
        if context and len(text) > 2 * context * self.longest:
            raise BadParam(f"the prompt is {len(text)} characters, more than this model's context of {context} tokens holds",
                           param, "context_length_exceeded")  # fmt: skip
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def piece(self, token_id: int) -> str:
        """One token's text on its own (special tokens shown)."""
        return self.tok.decode([token_id], skip_special_tokens=False)

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's text (special tokens shown), decoded in context so that multi-byte
        characters come out whole where they can."""
        out = []
        for i in range(len(ids)):
            window = ids[max(0, i - 4) : i + 1]
            before = self.tok.decode(window[:-1], skip_special_tokens=False)
            out.append(self.tok.decode(window, skip_special_tokens=False)[len(before) :])
        return out

    def chat(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **{k: v for k, v in self.specials.items() if v})
        except TemplateError as e:
            raise BadParam(f"the model's chat template refused these messages: {e}", "messages") from None


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialized AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_template_error(message: str):
    from jinja2 import TemplateError

    raise TemplateError(message)


class Tokenizers:
    """Each base model's TextTokenizer, loaded once (off the event loop) and kept."""

    def __init__(self) -> None:
        self._loaded: dict[str, TextTokenizer] = {}
        self._lock = threading.Lock()

    async def get(self, tokenizer_id: str) -> TextTokenizer:
        tok = self._loaded.get(tokenizer_id)
        if tok is None:
            tok = await asyncio.to_thread(self._load, tokenizer_id)
        return tok

    def _load(self, tokenizer_id: str) -> TextTokenizer:
        with self._lock:
            if tokenizer_id not in self._loaded:
                try:
                    self._loaded[tokenizer_id] = TextTokenizer(_folder(tokenizer_id))
                except Exception as e:  # not in the cache, offline, or unreadable: the operator's to fix
                    log.warning("tokenizer_unavailable", tokenizer=tokenizer_id, error=repr(e))
                    raise Unavailable(f"this gateway cannot load the tokenizer of {tokenizer_id!r}: {type(e).__name__}: {e}") from None
                log.info("tokenizer_loaded", tokenizer=tokenizer_id, chat_template=self._loaded[tokenizer_id].has_chat_template)
            return self._loaded[tokenizer_id]


def _folder(tokenizer_id: str) -> str:
    """The folder with the tokenizer's files: the model's own folder, or its Hugging Face snapshot
    (the cache, as HF_HOME and HF_HUB_OFFLINE say; downloaded when online and not cached)."""
    if os.path.isdir(tokenizer_id):
        return tokenizer_id
    from huggingface_hub import snapshot_download

    return snapshot_download(tokenizer_id, allow_patterns=list(TextTokenizer.FILES))


# -- reading a request -------------------------------------------------------------------


class Params:
    """A request's JSON object, read field by field; every refusal names its field."""

    def __init__(self, body: Any, allowed: set[str]):
        if not isinstance(body, dict):
            raise BadParam("the request body must be a JSON object", None)
        for key, value in body.items():
            if key in allowed or value is None:
                continue
            if key in NEUTRAL:
                if not any(value == v and type(value) is not bool for v in NEUTRAL[key]):
                    raise BadParam(f"{key} is not supported by this server; leave it out", key, "unsupported_parameter")
                continue
            raise BadParam(f"unsupported parameter {_shown(key)}", key[:100], "unsupported_parameter")
        self.body = body

    def get(self, key: str, default: Any = None) -> Any:
        value = self.body.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise BadParam(f"{key} must be an integer in [{lo}, {hi}], got {_shown(value)}", key)
        return value

    def float(self, key: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
        value = self.get(key, default)
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        except OverflowError:  # an integer past float's range
            number = math.nan
        if not math.isfinite(number) or not (lo < number if open_lo else lo <= number) or number > hi:
            raise BadParam(f"{key} must be a number in {'(' if open_lo else '['}{lo}, {hi}], got {_shown(value)}", key)
        return number

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise BadParam(f"{key} must be true or false, got {_shown(value)}", key)
        return value

    def stop(self) -> list[str]:
        value = self.get("stop", [])
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
            raise BadParam(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in stops):
            raise BadParam(f"a stop string may hold at most {MAX_STOP_STRING_CHARS} characters", "stop")
        return stops

    def stream_options(self, stream: bool) -> bool:
        """Whether the stream ends with a usage chunk."""
        opts = self.body.get("stream_options")
        if opts is None:
            return False
        if not stream:
            raise BadParam("stream_options is only allowed with stream: true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "continuous_usage_stats"} or not isinstance(opts.get("include_usage", False), bool):
            raise BadParam("stream_options may only hold include_usage (true or false)", "stream_options")
        return bool(opts.get("include_usage"))


def _shown(value: Any) -> str:
    """A client's value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


@dataclass(frozen=True)
class Sampling:
    """What every prompt of a request is sampled with."""

    n: int
    max_tokens: int | None  # None: the rest of the context
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    logprobs: int | None  # top alternatives per token; None: no logprobs asked
    echo: bool = False


def _sampling(p: Params, max_tokens_default: int | None, logprobs: int | None, echo: bool = False) -> Sampling:
    max_tokens = p.int("max_completion_tokens", None, 1, 2**31 - 1) if "max_completion_tokens" in p.body else None
    if max_tokens is None:
        max_tokens = p.int("max_tokens", max_tokens_default, 0 if echo else 1, 2**31 - 1)
    return Sampling(
        n=p.int("n", 1, 1, MAX_N),
        max_tokens=max_tokens,
        temperature=p.float("temperature", 1.0, 0.0, 2.0),
        top_p=p.float("top_p", 1.0, 0.0, 1.0, open_lo=True),
        top_k=_top_k(p),
        seed=p.int("seed", None, -(2**63), 2**63 - 1),
        stop=p.stop(),
        logprobs=logprobs,
        echo=echo,
    )


def _top_k(p: Params) -> int:
    value = p.int("top_k", -1, -1, 2**31 - 1)
    if value == 0:  # vLLM's spelling of "off" besides -1
        return -1
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages as the template sees them: role and text content."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MESSAGES:
        raise BadParam(f"messages must be a list of 1 to {MAX_MESSAGES} messages", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadParam(f"{where} must be an object with role and content", where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise BadParam(f"{where}.{sorted(extra)[0]} is not supported by this server (no tools or function calls)", f"{where}.{sorted(extra)[0]}")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise BadParam(f"{where}.role must be system, developer, user or assistant, got {_shown(role)}", f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadParam(f"{where}.content: only text parts are supported (this server serves text-only models)", f"{where}.content")
                parts.append(part["text"])
            content = "\n".join(parts)
        if not isinstance(content, str):
            raise BadParam(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompts(value: Any, tok: TextTokenizer, context: int) -> tuple[list[list[int]], list[str | None]]:
    """Completions' prompt as token ids per prompt, and each prompt's text where it came as text."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise BadParam("prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        value = [value]
    if len(value) > MAX_PROMPTS:
        raise BadParam(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}", "prompt")
    ids, texts = [], []
    for p in value:
        if isinstance(p, str):
            ids.append(tok.encode(p, special=True, context=context))
            texts.append(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids.append(p)
            texts.append(None)
        else:
            raise BadParam("prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids", "prompt")
    return ids, texts


# -- the model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What a request's `model` samples: a base model, with an adapter or without."""

    name: str  # as the client spelled it
    base_model: str
    weights: str | None
    lora: Any
    sampler: WorkerInfo  # a live sampler of the base model (its context, vocabulary, tokenizer)


async def resolve(gw: Gateway, model: Any, owner: str) -> Target:
    if not isinstance(model, str) or not model:
        raise BadParam("model is required: a base model, a tinker://.../sampler_weights/... path or a sampling session id", "model")
    if model.startswith("tinker://"):
        try:
            saved = await gw.saved_weights(model, owner)
        except NotFound as e:
            raise ModelNotFound(str(e)) from None
        except InvalidRequest as e:
            raise BadParam(str(e), "model") from None
        return Target(model, saved.base_model, saved.object, saved.lora, await _sampler_of(gw, saved.base_model))
    if ":sample:" in model:
        try:
            rec = await gw.sampler(check_id(model, "sampling session id"), owner)
        except InvalidRequest:  # malformed, unknown or another key's
            raise ModelNotFound(f"no model {_shown(model)}") from None
        return Target(model, rec.base_model, rec.weights, rec.lora, await _sampler_of(gw, rec.base_model))
    samplers = [w for w in await gw.workers() if w.kind == "sampler"]
    for w in samplers:
        if model in (w.base_model, w.model_name):
            return Target(model, w.base_model, None, None, w)
    if not samplers:
        raise Unavailable("no sampler is running yet; retry shortly")
    served = sorted({w.model_name or w.base_model for w in samplers})
    raise ModelNotFound(f"the model {_shown(model)} does not exist here; base models served: {served}, or a tinker://.../sampler_weights/... path")


async def _sampler_of(gw: Gateway, base_model: str) -> WorkerInfo:
    for w in await gw.workers():
        if w.kind == "sampler" and base_model in (w.base_model, w.model_name):
            return w
    raise Unavailable(f"no sampler of {base_model!r} is running; retry shortly")


def _check_context(ids: list[int], s: Sampling, info: WorkerInfo, prompt_param: str) -> int | None:
    """The max_tokens this prompt is sampled with; a 400 if the prompt or max_tokens is past the context."""
    if not ids:
        raise BadParam("the prompt is empty", prompt_param)
    if info.vocab_size and any(not 0 <= t < info.vocab_size for t in ids):
        raise BadParam(f"prompt token ids must be in [0, {info.vocab_size})", prompt_param)
    context = info.max_context
    if context and len(ids) >= context:
        raise BadParam(f"the prompt is {len(ids)} tokens; this model's context is {context} tokens", prompt_param, "context_length_exceeded")
    if s.max_tokens is None:
        return context - len(ids) if context else None
    asked = max(s.max_tokens, 1)  # echo with max_tokens 0 samples one token and shows none
    if context and len(ids) + asked > context:
        raise BadParam(
            f"max_tokens ({s.max_tokens}) + the prompt ({len(ids)} tokens) exceeds this model's context of {context} tokens",
            "max_tokens", "context_length_exceeded",
        )  # fmt: skip
    return asked


# -- one request's samples ---------------------------------------------------------------


@dataclass
class Job:
    """One prompt's sample request, in flight."""

    request_id: str
    prompt: list[int]
    text: str | None  # the prompt as the client sent it, if as text
    stream_seq: int = 0  # its message's sequence in the sample stream, once published


class Run:
    """The sample requests of one OpenAI request: submit, await, cancel."""

    def __init__(self, gw: Gateway, owner: str, target: Target, sampling: Sampling):
        self.gw, self.owner, self.target, self.sampling = gw, owner, target, sampling
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.jobs: list[Job] = []

    async def submit(self, prompts: list[list[int]], texts: list[str | None], max_tokens: list[int | None]) -> None:
        """Queue one sample request per prompt. Every message is built (and checked) before
        the first is queued; if the bus fails midway, what was queued is cancelled."""
        if await self.gw.sample_backlog() >= self.gw.cfg.sample_queue_max:
            raise QueueFull("sample queue is full; retry shortly")
        msgs = [self._message(i, ids, mt) for i, (ids, mt) in enumerate(zip(prompts, max_tokens, strict=True))]
        try:
            for msg, ids, text in zip(msgs, prompts, texts, strict=True):
                job = Job(request_id=msg.request_id, prompt=ids, text=text)
                self.jobs.append(job)
                await self.gw.accept(msg.request_id, self.owner, "Sample")
                ack = await self.gw.bus.publish(subjects.sample(self.target.base_model), msg, msg_id=msg.request_id)
                job.stream_seq = ack.seq
        except BaseException:
            try:
                await asyncio.shield(self.cancel())
            except Exception as e:  # the bus is down: the futures expire with their TTL
                log.warning("openai_cancel_failed", id=self.id, error=repr(e))
            raise
        log.info("openai_request_queued", id=self.id, model=self.target.name, prompts=len(prompts), n=self.sampling.n)

    def _message(self, i: int, ids: list[int], max_tokens: int | None) -> SampleRequest:
        """The SampleRequest of prompt `i`, built as an SDK sample's is (service.sample_fields)."""
        s = self.sampling
        body = bodies.ASampleBody(
            sampling_session_id=self.target.name, seq_id=i, num_samples=s.n,
            prompt=bodies.ModelInput(chunks=[bodies.Chunk(tokens=ids)]),
            sampling_params=bodies.SamplingParams(max_tokens=max_tokens, seed=s.seed, stop=s.stop or None, temperature=s.temperature,
                                                  top_k=s.top_k, top_p=s.top_p),
            prompt_logprobs=s.echo and s.logprobs is not None,
            topk_prompt_logprobs=(s.logprobs or 0) if s.echo else 0,
            topk_sample_logprobs=s.logprobs or 0,
        )  # fmt: skip
        return SampleRequest(request_id=f"sample-oai-{self.id}-{i}", sampler_id=self.target.name, base_model=self.target.base_model,
                             weights=self.target.weights, lora=self.target.lora, **sample_fields(body))  # fmt: skip

    async def wait(self, gone) -> list[SampleResult]:
        """Every job's result, in order. While one is pending, `await gone()` is asked every
        POLL_S: when it says the client has gone, the requests are cancelled and ClientGone
        raised. A failed sample cancels the others and raises its error."""
        results: list[SampleResult] = []
        for job in self.jobs:
            while True:
                fut = await self.gw.waiters.wait(job.request_id, POLL_S)
                if fut is None:
                    raise Unavailable("the sample request's result expired; send the request again")
                if fut.state == "done":
                    results.append(decode(fut.payload, SampleResult))
                    break
                if fut.state == "failed":
                    await self.cancel()
                    raise BadParam(fut.error, None) if fut.category == "user" else SampleFailed(fut.error)
                if await gone():
                    await self.cancel()
                    raise ClientGone()
                if self.gw.waiters.closing:  # the gateway is stopping: answer now, free the work
                    await self.cancel()
                    raise Unavailable("the gateway is shutting down; send the request again")
        return results

    async def cancel(self) -> None:
        """Free what is still pending: fail its future (a sampler that takes it later skips it),
        delete its message from the sample queue if no sampler has acked it yet, and tell the
        samplers (a core-NATS notice): one generating it stops at its next step."""
        for job in self.jobs:
            pending = await self.gw.bus.pending_future(job.request_id)
            if pending is None:
                continue
            stored, revision = pending
            fut = Future(request_id=job.request_id, owner=stored.owner, request_type=stored.request_type, state="failed",
                         error=CANCELLED, category="user", created_at=stored.created_at, finished_at=time.time())  # fmt: skip
            if not await self.gw.bus.finish_pending(fut, revision):
                continue  # it finished meanwhile
            if job.stream_seq:
                try:
                    await self.gw.bus.js.delete_msg(subjects.SAMPLE_STREAM, job.stream_seq)
                except Exception as e:  # acked meanwhile (gone already), or no permission: the sampler skips it
                    log.debug("openai_delete_failed", request_id=job.request_id, error=repr(e))
            try:  # at most once: a sampler that misses it computes the request and stores nothing
                await self.gw.bus.nc.publish(subjects.cancel(self.target.base_model, job.request_id), b"")
            except Exception as e:
                log.warning("openai_cancel_notice_failed", request_id=job.request_id, error=repr(e))
            log.info("openai_request_cancelled", id=self.id, request_id=job.request_id)


class ClientGone(Exception):
    """The client closed its connection before its answer."""


class SampleFailed(Unavailable):
    """A sample failed for a reason of the server's (not the request's)."""


# -- answers -----------------------------------------------------------------------------


@dataclass
class Choice:
    index: int
    text: str
    finish_reason: str
    tokens: list[int]  # generated, up to the stop
    logprobs: list[float]
    top: list[list[tuple[int, float]]] | None  # per token, the top alternatives


def _choices(results: list[SampleResult], jobs: list[Job], s: Sampling, tok: TextTokenizer) -> list[Choice]:
    out = []
    for p, (res, job) in enumerate(zip(results, jobs, strict=True)):
        for j, seq in enumerate(res.sequences):
            tokens = list(_ints(seq.tokens, "<i4"))
            lps = list(_floats(seq.logprobs))
            top = _topk(seq.topk) if seq.topk is not None else None
            if s.echo and s.max_tokens == 0:  # the one sampled token was only there to score the prompt
                tokens, lps, top = [], [], [] if top is not None else None
            text = tok.decode(tokens)
            reason = "stop" if seq.stop_reason == "stop" else "length"
            cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
            if cut >= 0:  # OpenAI leaves the stop string out
                text, reason = text[:cut], "stop"
                keep = _tokens_within(tok, tokens, cut)
                tokens, lps, top = tokens[:keep], lps[:keep], None if top is None else top[:keep]
            out.append(Choice(index=p * s.n + j, text=text, finish_reason=reason, tokens=tokens, logprobs=lps, top=top))
    return out


def _tokens_within(tok: TextTokenizer, tokens: list[int], chars: int) -> int:
    """How many of `tokens` it takes to reach `chars` characters of their text."""
    for k in range(len(tokens) + 1):
        if len(tok.decode(tokens[:k])) >= chars:
            return k
    return len(tokens)


def _ints(data: bytes, dtype: str) -> list[int]:
    return np.frombuffer(data, dtype=dtype).tolist()


def _floats(data: bytes) -> list[float]:
    return np.frombuffer(data, dtype="<f4").astype(float).tolist()


def _topk(t) -> list[list[tuple[int, float]]]:
    ids = np.frombuffer(t.tokens, dtype="<i8").reshape(-1, t.k)
    lps = np.frombuffer(t.logprobs, dtype="<f4").reshape(-1, t.k)
    return [[(int(i), float(lp)) for i, lp in zip(row_i, row_l) if i >= 0 and lp > -99999] for row_i, row_l in zip(ids, lps)]


def _usage(jobs: list[Job], results: list[SampleResult]) -> dict[str, int]:
    prompt = sum(len(j.prompt) for j in jobs)
    completion = sum(len(seq.tokens) // 4 for r in results for seq in r.sequences)  # int32 each: every token generated
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(c: Choice, job: Job, res: SampleResult, tok: TextTokenizer, s: Sampling) -> dict[str, Any]:
    """The legacy completions `logprobs` object; with echo, the prompt's tokens come first
    (the first one has no logprob), as OpenAI's."""
    ids, lps, tops = [], [], []
    offset = 0
    if s.echo:
        prompt_lps = _floats(res.prompt_logprobs) if res.prompt_logprobs is not None else [math.nan] * len(job.prompt)
        prompt_top = _topk(res.topk_prompt) if res.topk_prompt is not None else [[] for _ in job.prompt]
        ids += job.prompt
        lps += [None if i == 0 or math.isnan(v) else v for i, v in enumerate(prompt_lps)]
        tops += [None if i == 0 else row for i, row in enumerate(prompt_top)]
    ids += c.tokens
    lps += c.logprobs
    tops += c.top if c.top is not None else [[] for _ in c.tokens]
    pieces = tok.pieces(ids)
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    k = s.logprobs or 0
    return {
        "tokens": pieces,
        "token_logprobs": lps,
        "top_logprobs": [None if row is None else {tok.piece(i): lp for i, lp in row[:k]} for row in tops] if k else None,
        "text_offset": offsets,
    }


def _chat_logprobs(c: Choice, tok: TextTokenizer, k: int) -> dict[str, Any]:
    def entry(piece: str, lp: float) -> dict[str, Any]:
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    content = []
    tops = c.top if c.top is not None else [[] for _ in c.tokens]
    for piece, lp, row in zip(tok.pieces(c.tokens), c.logprobs, tops, strict=True):
        alts = [entry(tok.piece(i), alp) for i, alp in row[:k]]
        content.append({**entry(piece, lp), "top_logprobs": alts})
    return {"content": content, "refusal": None}


# -- the routes --------------------------------------------------------------------------


class OpenAI:
    def __init__(self, gw: Gateway, catalogue):
        self.gw = gw
        self.catalogue = catalogue
        self.tokenizers = Tokenizers()

    def owner(self, request: web.Request) -> str:
        return bearer_owner(self.gw, request)

    async def _start(self, request: web.Request, allowed: set[str]) -> tuple[str, Params, Target]:
        owner = self.owner(request)
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw or b"{}")
        except msgspec.DecodeError as e:
            raise BadParam(f"the request body is not valid JSON: {e}", None) from None
        p = Params(body, allowed)
        return owner, p, await resolve(self.gw, p.body.get("model"), owner)

    @_openai_errors
    @_admitted
    async def completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI completions: text (or token ids) in, sampled text out; echo + logprobs score a prompt."""
        owner, p, target = await self._start(request, COMPLETION_PARAMS)
        logprobs = p.int("logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
        echo = p.bool("echo", False)
        s = _sampling(p, DEFAULT_COMPLETION_TOKENS, logprobs, echo)
        best_of = p.int("best_of", None, 1, MAX_N)
        if best_of is not None and best_of != s.n:
            raise BadParam("best_of other than n is not supported by this server", "best_of", "unsupported_parameter")
        if s.max_tokens == 0 and not echo:
            raise BadParam("max_tokens must be >= 1 (0 only with echo, to score the prompt)", "max_tokens")
        stream = p.bool("stream", False)
        include_usage = p.stream_options(stream)
        tok = await self.tokenizers.get(target.sampler.tokenizer_id or target.base_model)
        prompts, texts = await asyncio.to_thread(_prompts, p.body.get("prompt"), tok, target.sampler.max_context)
        if len(prompts) * s.n > MAX_SEQUENCES:
            raise BadParam(f"prompts x n must be at most {MAX_SEQUENCES}, got {len(prompts) * s.n}", "n")
        max_tokens = [_check_context(ids, s, target.sampler, "prompt") for ids in prompts]
        run = Run(self.gw, owner, target, s)
        await run.submit(prompts, texts, max_tokens)

        def choices(results: list[SampleResult]) -> list[dict[str, Any]]:
            out = []
            for c in _choices(results, run.jobs, s, tok):
                job, res = run.jobs[c.index // s.n], results[c.index // s.n]
                text = ((job.text if job.text is not None else tok.decode(job.prompt)) + c.text) if echo else c.text
                lp = _completion_logprobs(c, job, res, tok, s) if logprobs is not None else None
                out.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason})
            return out

        head = {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": target.name}
        if not stream:
            results = await run.wait(_connection_closed(request))
            return http.reply({**head, "choices": choices(results), "usage": _usage(run.jobs, results)}, headers=_ids(run))

        def chunks(results: list[SampleResult]) -> list[list[dict[str, Any]]]:
            done = choices(results)
            return [[{**c, "finish_reason": None}] for c in done] + [
                [{"index": c["index"], "text": "", "logprobs": None, "finish_reason": c["finish_reason"]}] for c in done
            ]

        return await self._stream(request, run, head, include_usage, [], chunks)

    @_openai_errors
    @_admitted
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI chat completions: messages through the base model's chat template, one message back per choice."""
        owner, p, target = await self._start(request, CHAT_PARAMS)
        messages = _messages(p.body.get("messages"))
        want_logprobs = p.bool("logprobs", False)
        top = p.int("top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want_logprobs:
            raise BadParam("top_logprobs needs logprobs: true", "top_logprobs")
        s = _sampling(p, None, (top or 0) if want_logprobs else None)
        stream = p.bool("stream", False)
        include_usage = p.stream_options(stream)
        tok = await self.tokenizers.get(target.sampler.tokenizer_id or target.base_model)
        ids = await asyncio.to_thread(lambda: tok.encode(tok.chat(messages), special=False, context=target.sampler.max_context, param="messages"))
        max_tokens = [_check_context(ids, s, target.sampler, "messages")]
        run = Run(self.gw, owner, target, s)
        await run.submit([ids], [None], max_tokens)

        def choices(results: list[SampleResult]) -> list[tuple[Choice, dict[str, Any] | None]]:
            return [(c, _chat_logprobs(c, tok, top or 0) if want_logprobs else None) for c in _choices(results, run.jobs, s, tok)]

        head = {"id": f"chatcmpl-{run.id}", "object": "chat.completion", "created": run.created, "model": target.name}
        if not stream:
            results = await run.wait(_connection_closed(request))
            out = [
                {"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": lp, "finish_reason": c.finish_reason}
                for c, lp in choices(results)
            ]
            return http.reply({**head, "choices": out, "usage": _usage(run.jobs, results)}, headers=_ids(run))

        def chunks(results: list[SampleResult]) -> list[list[dict[str, Any]]]:
            done = choices(results)
            return [[{"index": c.index, "delta": {"content": c.text}, "logprobs": lp, "finish_reason": None}] for c, lp in done] + [
                [{"index": c.index, "delta": {}, "logprobs": None, "finish_reason": c.finish_reason}] for c, _ in done
            ]

        head["object"] = "chat.completion.chunk"
        first = [[{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}] for i in range(s.n)]
        return await self._stream(request, run, head, include_usage, first, chunks)

    async def _stream(self, request: web.Request, run: Run, head: dict[str, Any], include_usage: bool, first, chunks) -> web.StreamResponse:
        """Server-sent events: the `first` chunks now, `: keepalive` comments while the samples run
        (a write is also how a dead peer shows), then `chunks(results)`, a usage chunk if asked,
        and `data: [DONE]`."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_ids(run)})
        usage = {"usage": None} if include_usage else {}
        last_write = time.monotonic()

        async def write(raw: bytes) -> None:
            nonlocal last_write
            await resp.write(raw)
            last_write = time.monotonic()

        async def send(data: Any) -> None:
            await write(b"data: " + (data if isinstance(data, bytes) else msgspec.json.encode(data)) + b"\n\n")

        async def gone() -> bool:
            if _closed(request):
                return True
            try:
                if time.monotonic() - last_write > KEEPALIVE_S:
                    await write(b": keepalive\n\n")
            except ConnectionResetError:
                return True
            return False

        try:
            await resp.prepare(request)
            for choices in first:
                await send({**head, "choices": choices, **usage})
            try:
                results = await run.wait(gone)
            except (InvalidRequest, Unavailable) as e:  # too late for a status: an error event, as OpenAI's
                await send(_answer(e)[1])
                await send(b"[DONE]")
                return resp
            for choices in chunks(results):
                await send({**head, "choices": choices, **usage})
            if include_usage:
                await send({**head, "choices": [], "usage": _usage(run.jobs, results)})
            await send(b"[DONE]")
            await resp.write_eof()
        except (ClientGone, ConnectionResetError):
            await run.cancel()  # nothing left to free if the answer was complete
            log.info("openai_client_gone", id=run.id)
        except asyncio.CancelledError:
            await asyncio.shield(run.cancel())
            raise
        return resp

    @_openai_errors
    async def models(self, request: web.Request) -> web.Response:
        """OpenAI model list: the base models samplers serve here, and the key's sampler weights."""
        owner = self.owner(request)
        return http.reply({"object": "list", "data": await self._models(owner)})

    @_openai_errors
    async def model(self, request: web.Request) -> web.Response:
        """One model: a base model, or sampler weights the key may read."""
        owner = self.owner(request)
        name = request.match_info["model"]
        for m in await self._models(owner):
            if m["id"] == name:
                return http.reply(m)
        target = await resolve(self.gw, name, owner)  # a published checkpoint or a sampling session; 404 if not readable
        return http.reply({"id": target.name, "object": "model", "created": 0, "owned_by": "openrl", "root": target.base_model,
                           "parent": target.base_model})  # fmt: skip

    async def _models(self, owner: str) -> list[dict[str, Any]]:
        bases: dict[str, WorkerInfo] = {}
        for w in await self.gw.workers():
            if w.kind == "sampler":
                bases.setdefault(w.model_name or w.base_model, w)
        out = [{"id": name, "object": "model", "created": int(w.started_at), "owned_by": "openrl", "root": w.base_model,
                "max_model_len": w.max_context} for name, w in sorted(bases.items())]  # fmt: skip
        for rec in await self.catalogue.checkpoints(owner=owner):
            if rec.kind == "sampler":
                out.append({"id": rec.path, "object": "model", "created": int(rec.created_at), "owned_by": owner, "root": rec.base_model,
                            "parent": rec.base_model})  # fmt: skip
        return out


def _closed(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _connection_closed(request: web.Request):
    """`Run.wait`'s `gone` for a plain answer: the client's connection is closed."""

    async def gone() -> bool:
        return _closed(request)

    return gone


def _ids(run: Run) -> dict[str, str]:
    """The bus request ids of an answer's samples (the Tinker routes' retrieve_future reads them)."""
    return {"X-OpenRL-Request-Ids": ",".join(j.request_id for j in run.jobs)}


def add_routes(app: web.Application, gw: Gateway, catalogue) -> None:
    """The OpenAI-compatible routes, under /v1."""
    api = OpenAI(gw, catalogue)
    r = app.router
    r.add_post("/v1/completions", api.completions)
    r.add_post("/v1/chat/completions", api.chat_completions)
    r.add_get("/v1/models", api.models)
    r.add_get("/v1/models/{model:.+}", api.model)
