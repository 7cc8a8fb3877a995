"""Session search pages: walking the cursor visits every matching session exactly once.

The cursor carries an ISO time (microseconds) while sessions are stored with a float
timestamp; a page boundary must not hand back the cursor's own session or skip a neighbour.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
import tinker
from tinker import types

from stack_helpers import API_KEY

pytestmark = pytest.mark.timeout(300)


def test_cursor_walk_visits_each_session_once(stack):
    tag = uuid.uuid4().hex
    http = httpx.Client(base_url=f"{stack.url}/api/v1", headers={"X-API-Key": API_KEY}, timeout=30)
    made = [http.post("/create_session", json={"user_metadata": {"walk": tag}}).json()["session_id"] for _ in range(10)]
    rest = tinker.ServiceClient(base_url=stack.url, api_key=API_KEY).create_rest_client()
    seen, cursor = [], None
    for _ in range(len(made) + 2):
        page = rest.search_sessions(types.SessionSearchRequest(user_metadata={"walk": tag}, limit=1, cursor=cursor)).result()
        seen += [s.session_id for s in page.sessions]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(seen) == sorted(made) and len(seen) == len(set(seen)), seen


def test_malformed_cursor_is_a_400(stack):
    body = {"limit": 1, "cursor": {"last_created_at": "yesterday", "last_session_id": "s-x"}}
    resp = httpx.post(f"{stack.url}/api/v1/sessions/search", json=body, headers={"X-API-Key": API_KEY}, timeout=30)
    assert resp.status_code == 400 and "cursor" in resp.text
