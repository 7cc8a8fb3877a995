"""A small client for OpenRL's scoring API, for use next to the tinker SDK (no torch).

    from openrl.client import RewardClient

    rewards = RewardClient()  # TINKER_BASE_URL / TINKER_API_KEY, like the SDK
    scores = rewards.score("math", [{"prompt": p, "completion": c, "reference": "42"}])
    rewards_G = [s.reward for s in scores]  # None where the reward function failed (s.error says why)

`AsyncRewardClient` is the same with `await`. Each `score` call sends one idempotency key
with all its retries, so a request that is retried after a dropped connection is scored
once. Results are long-polled through the same `retrieve_future` endpoint as Tinker's.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from openrl.bus.errors import InvalidRequest, NotFound, OpenRLError, Unauthorized, Unavailable

API = "/api/v1"
_RETRY_STATUS = {429, 502, 503, 504}


class ScoringFailed(OpenRLError, RuntimeError):
    """The scoring request as a whole failed (not one item: those come back as Score.error)."""


@dataclass(frozen=True)
class Score:
    """One item's outcome. `reward` is None when the reward function failed on this item."""

    reward: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None  # exception | timeout | crashed | memory | bad_result
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _items(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "completion" not in item:
            raise InvalidRequest(f"item {i} must be a mapping with 'completion' (and 'prompt', 'reference')")
        out.append({"prompt": item.get("prompt", ""), "completion": item["completion"], "reference": item.get("reference")})
    return out


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    error = {401: Unauthorized, 404: NotFound}.get(response.status_code)
    if error is None:
        error = InvalidRequest if response.status_code < 500 else Unavailable
    raise error(f"HTTP {response.status_code}: {detail}")


def _scores(body: dict) -> list[Score]:
    if "error" in body and "scores" not in body:
        raise ScoringFailed(f"{body.get('category', 'unknown')} error: {body['error']}")
    return [
        Score(reward=s.get("reward"), metrics=s.get("metrics") or {}, error=s.get("error"), error_kind=s.get("error_kind"),
              seconds=s.get("seconds", 0.0))
        for s in body["scores"]
    ]  # fmt: skip


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout_s: float, retry_s: float):
        self.base_url = (base_url or os.environ.get("TINKER_BASE_URL") or "http://127.0.0.1:8000").rstrip("/")
        api_key = api_key or os.environ.get("TINKER_API_KEY")
        if not api_key:
            raise Unauthorized("no API key: pass api_key= or set TINKER_API_KEY")
        self.headers = {"X-API-Key": api_key}
        self.timeout_s = timeout_s  # how long score() waits for results
        self.retry_s = retry_s  # how long a request is retried while the server is unavailable

    def _submit_body(self, reward_name: str, items, idempotency_key: str | None) -> dict:
        return {"reward_name": reward_name, "items": _items(items), "idempotency_key": idempotency_key or uuid.uuid4().hex}


class RewardClient(_Base):
    """Blocking client. `score(name, items)` submits, waits and returns one Score per item."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout_s: float = 600.0, retry_s: float = 60.0):
        super().__init__(base_url, api_key, timeout_s, retry_s)
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=httpx.Timeout(60.0, connect=10.0))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw) -> httpx.Response:
        deadline = time.monotonic() + self.retry_s
        delay = 0.2
        while True:
            try:
                r = self.http.request(method, f"{API}{path}", **kw)
                if r.status_code not in _RETRY_STATUS:
                    return r
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            else:
                if time.monotonic() > deadline:
                    return r
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def rewards(self) -> list[dict]:
        """The reward functions served now: name, workers, concurrency, busy_fraction."""
        r = self._request("GET", "/rewards")
        _raise_for(r)
        return r.json()["rewards"]

    def submit(self, reward_name: str, items: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None) -> str:
        """Queue items for scoring; returns the request id to pass to `result`."""
        r = self._request("POST", "/score", json=self._submit_body(reward_name, items, idempotency_key))
        _raise_for(r)
        return r.json()["request_id"]

    def result(self, request_id: str, timeout_s: float | None = None) -> list[Score]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            r = self._request("POST", "/retrieve_future", json={"request_id": request_id})
            if r.status_code != 408:
                _raise_for(r)
                return _scores(r.json())
            if time.monotonic() > deadline:
                raise TimeoutError(f"scoring request {request_id} not finished after {timeout_s:g} s")

    def score(self, reward_name: str, items: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None,
              timeout_s: float | None = None) -> list[Score]:  # fmt: skip
        return self.result(self.submit(reward_name, items, idempotency_key=idempotency_key), timeout_s)


class AsyncRewardClient(_Base):
    """The same with asyncio: `await client.score(name, items)`; many at once are fine."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout_s: float = 600.0, retry_s: float = 60.0):
        super().__init__(base_url, api_key, timeout_s, retry_s)
        self.http = httpx.AsyncClient(base_url=self.base_url, headers=self.headers, timeout=httpx.Timeout(60.0, connect=10.0))

    async def close(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _request(self, method: str, path: str, **kw) -> httpx.Response:
        deadline = time.monotonic() + self.retry_s
        delay = 0.2
        while True:
            try:
                r = await self.http.request(method, f"{API}{path}", **kw)
                if r.status_code not in _RETRY_STATUS:
                    return r
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
            else:
                if time.monotonic() > deadline:
                    return r
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def rewards(self) -> list[dict]:
        r = await self._request("GET", "/rewards")
        _raise_for(r)
        return r.json()["rewards"]

    async def submit(self, reward_name: str, items: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None) -> str:
        r = await self._request("POST", "/score", json=self._submit_body(reward_name, items, idempotency_key))
        _raise_for(r)
        return r.json()["request_id"]

    async def result(self, request_id: str, timeout_s: float | None = None) -> list[Score]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            r = await self._request("POST", "/retrieve_future", json={"request_id": request_id})
            if r.status_code != 408:
                _raise_for(r)
                return _scores(r.json())
            if time.monotonic() > deadline:
                raise TimeoutError(f"scoring request {request_id} not finished after {timeout_s:g} s")

    async def score(self, reward_name: str, items: Iterable[Mapping[str, Any]], *, idempotency_key: str | None = None,
                    timeout_s: float | None = None) -> list[Score]:  # fmt: skip
        return await self.result(await self.submit(reward_name, items, idempotency_key=idempotency_key), timeout_s)
