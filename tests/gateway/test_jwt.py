"""JWT mode: auth/token trades an API key for a short-lived HS256 JWT that every gateway
accepts in X-API-Key; a bad, expired or revoked one is a 401 with a JSON body and the
`invalid_token` challenge the SDK answers by fetching a fresh JWT and replaying once."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import pytest
import tinker
from tinker import types

from openrl.bus.client import Bus
from openrl.demo import make_datum, sft_examples
from openrl.gateway import auth
from openrl.gateway.http import key_id

from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY, bus_config

pytestmark = pytest.mark.timeout(300)


def post_token(url: str, key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.post(f"{url}/api/v1/auth/token", json={}, headers=headers, timeout=30)


def sessions(url: str, key: str) -> httpx.Response:
    return httpx.get(f"{url}/api/v1/sessions", headers={"X-API-Key": key}, timeout=30)


def claims(jwt: str) -> dict:
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def b64(obj: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def rejected_token(r: httpx.Response, says: str) -> None:
    assert r.status_code == 401, r.text
    assert r.json()["type"] == "unauthorized" and says in r.json()["detail"], r.text
    assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


async def _secret(nats_url: str) -> bytes:
    bus = await Bus.connect(bus_config(nats_url, "gateway", name="test-jwt"))  # the secrets are the gateway's alone
    try:
        return await auth.load_secret(bus)
    finally:
        await bus.close()


def test_client_config_advertises_jwt_mode_only_when_asked(stack, jwt_gateway):
    on = httpx.post(f"{jwt_gateway}/api/v1/client/config", json={"sdk_version": tinker.__version__}, timeout=30).json()
    off = httpx.post(f"{stack.url}/api/v1/client/config", json={"sdk_version": tinker.__version__}, timeout=30).json()
    assert on["pjwt_auth_enabled"] is True and off["pjwt_auth_enabled"] is False


def test_token_exchange_and_use_on_every_gateway(stack, jwt_gateway):
    r = post_token(jwt_gateway, API_KEY)
    assert r.status_code == 200, r.text
    jwt = r.json()["jwt"]
    c = claims(jwt)
    kid = key_id(API_KEY)
    assert jwt.startswith("eyJ") and (c["sub"], c["org_id"], c["key_id"], c["iss"]) == (f"openrl:key:{kid}", kid, kid, "openrl")
    assert c["exp"] - c["iat"] == auth.JWT_TTL_S and abs(c["iat"] - time.time()) < 60
    assert API_KEY not in jwt and API_KEY not in json.dumps(c)  # the key itself never travels in a JWT
    # Any replica accepts it, whatever its flag: the secret is the bus's.
    assert sessions(jwt_gateway, jwt).json() == sessions(jwt_gateway, API_KEY).json()
    assert sessions(stack.url, jwt).json() == sessions(stack.url, API_KEY).json()
    assert post_token(stack.url, API_KEY).status_code == 200  # either gateway issues them


def test_token_needs_an_api_key(jwt_gateway):
    for key, says in ((None, "missing"), ("tml-not-a-key", "unknown API key")):
        r = post_token(jwt_gateway, key)
        assert r.status_code == 401 and says in r.json()["detail"], r.text
    jwt = post_token(jwt_gateway, API_KEY).json()["jwt"]
    r = post_token(jwt_gateway, jwt)  # a JWT cannot renew itself
    assert r.status_code == 401 and "not a JWT" in r.json()["detail"], r.text


def test_bad_jwts_are_401_with_the_invalid_token_challenge(stack, jwt_gateway):
    jwt = post_token(jwt_gateway, API_KEY).json()["jwt"]
    header, payload, sig = jwt.split(".")
    other = {**claims(jwt), "key_id": key_id(OTHER_KEY), "sub": f"openrl:key:{key_id(OTHER_KEY)}"}
    longer = {**claims(jwt), "exp": claims(jwt)["exp"] + 86400}
    secret = asyncio.run(_secret(stack.nats_url))
    for url in (jwt_gateway, stack.url):
        rejected_token(sessions(url, f"{header}.{b64(other)}.{sig}"), "signature does not match")  # another tenant's claims
        rejected_token(sessions(url, f"{header}.{b64(longer)}.{sig}"), "signature does not match")  # a longer life
        rejected_token(sessions(url, f"{b64({'alg': 'none', 'typ': 'JWT'})}.{payload}."), "signature does not match")
        rejected_token(sessions(url, f"{header}.{payload}.{sig[:-2]}"), "signature does not match")
        rejected_token(sessions(url, "eyJub3QiOiJhIGp3dCJ9"), "malformed")
        rejected_token(sessions(url, auth.issue(b"another secret" * 3, key_id(API_KEY))), "signature does not match")
        # Signed with the real secret, but expired.
        rejected_token(sessions(url, auth.issue(secret, key_id(API_KEY), now=time.time() - 2 * auth.JWT_TTL_S)), "expired")
        # Signed with the real secret, for a key this stack does not know.
        rejected_token(sessions(url, auth.issue(secret, key_id("tml-never-issued-0000"))), "revoked or unknown")
        assert sessions(url, auth.issue(secret, key_id(API_KEY))).status_code == 200  # the forger's control


def test_sdk_trains_and_samples_through_jwts(stack, jwt_gateway):
    service = tinker.ServiceClient(base_url=jwt_gateway, api_key=API_KEY)
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=1).result()
    tok = tc.get_tokenizer()
    data = [make_datum(tok, q, a) for q, a in sft_examples(2, seed=9)]
    prompt = types.ModelInput.from_ints(tok.encode("say the word: apple"))
    out = tc.forward_backward(data, "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0
    path = tc.save_weights_for_sampler("jwt").result().path
    seqs = service.create_sampling_client(model_path=path).result().sample(prompt, 1, types.SamplingParams(max_tokens=3)).result().sequences
    assert len(seqs) == 1 and 1 <= len(seqs[0].tokens) <= 3
    # It held a JWT of ours all along, and made what the API key owns.
    token = service.holder.run_coroutine_threadsafe(service.holder.get_identity_jwt()).result(30)
    assert claims(token)["key_id"] == key_id(API_KEY)
    mine = tinker.RestClient(base_url=stack.url, api_key=API_KEY).list_user_checkpoints(limit=1000).result().checkpoints
    assert path in [c.tinker_path for c in mine]


def test_sdk_replaces_a_rejected_jwt_and_replays(jwt_gateway):
    rest = tinker.RestClient(base_url=jwt_gateway, api_key=API_KEY)
    first = rest.whoami().result()  # the SDK holds a JWT now
    provider = rest.holder._default_auth  # noqa: SLF001 - the SDK's JwtAuthProvider
    held = provider._token  # noqa: SLF001
    header, payload, sig = held.split(".")
    forged = f"{header}.{payload}.{'A' * len(sig)}"
    provider._token = forged  # noqa: SLF001 - as if the server had rotated its secret
    # 401 invalid_token, a new JWT, the replay: the answer the API key itself gets.
    replayed = rest.list_training_runs(limit=1).result()
    direct = httpx.get(f"{jwt_gateway}/api/v1/training_runs", params={"limit": 1}, headers={"X-API-Key": API_KEY}, timeout=30).json()
    assert replayed.cursor.total_count == direct["cursor"]["total_count"]
    assert [r.training_run_id for r in replayed.training_runs] == [r["training_run_id"] for r in direct["training_runs"]]
    assert provider._token != forged and sessions(jwt_gateway, provider._token).status_code == 200  # noqa: SLF001
    assert rest.whoami().result() == first


def test_revoking_a_key_ends_its_jwts(stack, jwt_gateway):
    made = stack.keys("create", "--name", "jwt-holder")
    assert made.returncode == 0, made.stdout + made.stderr
    key = made.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 10
    while (r := post_token(jwt_gateway, key)).status_code == 401 and time.monotonic() < deadline:
        time.sleep(0.2)  # the gateway's watch of the keys bucket catches up
    jwt = r.json()["jwt"]
    assert tinker.RestClient(base_url=jwt_gateway, api_key=key).whoami().result().org_urn == f"tml:organization:{key_id(key)}"
    assert sessions(jwt_gateway, jwt).status_code == 200
    assert stack.keys("revoke", "--name", "jwt-holder").returncode == 0
    deadline = time.monotonic() + 5
    while sessions(jwt_gateway, jwt).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key's JWT still works"
        time.sleep(0.1)
    rejected_token(sessions(jwt_gateway, jwt), "revoked or unknown")
    rejected_token(sessions(stack.url, jwt), "revoked or unknown")
    assert post_token(jwt_gateway, key).status_code == 401  # and it buys no new one
