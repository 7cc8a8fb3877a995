"""Every public method of the installed tinker SDK's clients, called against `openrl up`.

The table maps each method (its `_async` twin included) to a call with meaningful arguments
and a check of what came back. `test_every_method_is_in_the_table` fails when the SDK grows
a method the table does not handle. Methods that do not work yet are listed in NOT_YET,
strict xfails with the reason: the table is the honest to-do list, and a method that starts
working fails its xfail until it is taken off the list.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
import warnings
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
import tinker
from tinker import types

from openrl.demo import make_datum, sft_examples
from openrl.gateway.http import key_id

from stack_helpers import API_KEY, BASE_MODEL, OTHER_KEY

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::tinker.lib.experimental.ExperimentalWarning")]

AdminClient = getattr(tinker, "AdminClient", None)
CLIENTS = {
    "ServiceClient": tinker.ServiceClient,
    "TrainingClient": tinker.TrainingClient,
    "SamplingClient": tinker.SamplingClient,
    "RestClient": tinker.RestClient,
    **({"AdminClient": AdminClient} if AdminClient is not None else {}),
}


def public_methods() -> list[str]:
    return sorted(
        f"{cname}.{name}" for cname, cls in CLIENTS.items() for name, _ in inspect.getmembers(cls, callable) if not name.startswith("_")
    )


def base_name(method: str) -> str:
    return method[: -len("_async")] if method.endswith("_async") else method


NOT_YET: dict[str, str] = {}


# ---------------------------------------------------------------------- the world the calls share


def resolve(x, timeout: float = 180):
    """The value of an SDK future (APIFuture, Backcompat*Future), or `x` itself."""
    result = getattr(x, "result", None)
    return result(timeout=timeout) if callable(result) else x


class World:
    def __init__(self, stack):
        self.stack = stack
        self.service = tinker.ServiceClient(user_metadata={"suite": "surface"}, base_url=stack.url, api_key=API_KEY)
        self.tc = self.service.create_lora_training_client(base_model=BASE_MODEL, rank=4, seed=3, user_metadata={"run": "surface"}).result()
        self.tokenizer = self.tc.get_tokenizer()
        self.data = [make_datum(self.tokenizer, q, a) for q, a in sft_examples(4, seed=5)]
        self.prompt = types.ModelInput.from_ints(self.tokenizer.encode("say the word: apple"))
        self.rest = tinker.RestClient(base_url=stack.url, api_key=API_KEY)
        self.other = tinker.RestClient(base_url=stack.url, api_key=OTHER_KEY)
        self.admin = AdminClient(base_url=stack.url, api_key=API_KEY) if AdminClient else None
        self.http = httpx.Client(base_url=f"{stack.url}/api/v1", timeout=60)
        self.n = 0

    @property
    def session_id(self) -> str:
        return self.tc.get_info().model_id.split(":train:")[0]

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}-{self.n}"

    def state(self) -> str:
        return self.tc.save_state(self.name("state")).result().path

    def sampler_path(self) -> str:
        return self.tc.save_weights_for_sampler(self.name("sampler")).result().path

    def step(self, lr: float = 2e-2) -> None:
        self.tc.forward_backward(self.data, "cross_entropy").result()
        self.tc.optim_step(types.AdamParams(learning_rate=lr)).result()

    def forward(self, tc=None) -> list[np.ndarray]:
        out = (tc or self.tc).forward(self.data, "cross_entropy").result()
        return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]

    def greedy(self, sc) -> list[int]:
        return sc.sample(self.prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0)).result().sequences[0].tokens

    def user_checkpoints(self) -> list[types.Checkpoint]:
        return self.rest.list_user_checkpoints(limit=1000).result().checkpoints


@pytest.fixture(scope="module")
def world(stack):
    return World(stack)


def via(method: str):
    """A caller of `method` on an object: the sync method (its future resolved), or the
    `_async` twin run to completion."""

    def bind(obj):
        def call(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the deprecated twins warn; they must still work
                if method.endswith("_async"):

                    async def run():
                        return await getattr(obj, method)(*args, **kwargs)

                    return resolve(asyncio.run(run()))
                return resolve(getattr(obj, method)(*args, **kwargs))

        return call

    return bind


def assert_same(a: list[np.ndarray], b: list[np.ndarray], atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, atol=atol)


def assert_differ(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert any(not np.allclose(x, y, atol=1e-5) for x, y in zip(a, b))


# ---------------------------------------------------------------------- ServiceClient


def service_create_lora_training_client(w, call):
    tc = resolve(call(w.service)(base_model=BASE_MODEL, rank=2, seed=11, user_metadata={"k": "v"}))
    info = tc.get_info()
    assert info.model_data.model_name == BASE_MODEL and info.lora_rank == 2
    assert info.model_id.startswith(w.session_id + ":train:")
    assert w.rest.get_training_run(info.model_id).result().user_metadata == {"k": "v"}


def service_create_sampling_client(w, call):
    by_base = resolve(call(w.service)(base_model=BASE_MODEL))
    assert by_base.get_base_model() == BASE_MODEL and len(w.greedy(by_base)) > 0
    path = w.sampler_path()
    by_path = resolve(call(w.service)(model_path=path))
    assert w.greedy(by_path) == w.greedy(w.tc.create_sampling_client(path).result())


def service_create_training_client_from_state(w, call):
    path = w.state()
    before = w.forward()
    tc = resolve(call(w.service)(path))
    assert tc.get_info().model_id != w.tc.get_info().model_id
    assert_same(w.forward(tc), before)


def service_get_server_capabilities(w, call):
    caps = call(w.service)()
    models = {m.model_name: m for m in caps.supported_models}
    assert models[BASE_MODEL].trainable and models[BASE_MODEL].sampleable


def service_get_telemetry(w, call):
    assert call(w.service)() is None  # TINKER_TELEMETRY=0 in the tests


def service_get_console_url(w, call):
    url = call(w.service)()
    assert isinstance(url, str) and w.session_id in url


def service_create_rest_client(w, call):
    rest = call(w.service)()
    assert w.session_id in rest.list_sessions(limit=1000).result().sessions


def service_copy_weights(w, call):
    service = tinker.ServiceClient(base_url=w.stack.url, api_key=API_KEY, project_id="copies")
    source = w.state()
    copied = call(service)(source, ttl_seconds=7200)
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(copied)
    assert parsed.checkpoint_id == "weights/" + source.rsplit("/", 1)[-1] and copied != source
    assert w.rest.get_weights_info_by_tinker_path(copied).result().lora_rank == 4
    mine = {c.tinker_path: c for c in w.user_checkpoints()}
    assert mine[copied].checkpoint_type == "training" and mine[copied].expires_at is not None
    assert mine[copied].size_bytes == mine[source].size_bytes
    run = w.rest.get_training_run(parsed.training_run_id).result()  # a run of its own, in the project, not trainable
    assert run.base_model == BASE_MODEL and run.last_checkpoint.tinker_path == copied
    assert [r.training_run_id for r in w.rest.list_training_runs(limit=1000, project_id="copies").result().training_runs].count(parsed.training_run_id) == 1


def service_create_custom_loss(w, call):
    def neg_ll(logprobs, weights):
        loss = -(logprobs * weights).sum()
        return loss, {"custom/neg_ll:sum": loss}

    handle = call(w.service)(neg_ll, input_ranks={"logprobs": 1, "weights": 1})
    out = w.tc.forward_backward_custom(w.data, handle).result()
    builtin = w.tc.forward(w.data, "cross_entropy").result()
    assert out.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-4)
    w.tc.optim_step(types.AdamParams(learning_rate=0.0)).result()  # drop the accumulated gradient


def service_close(w, call):
    service = tinker.ServiceClient(base_url=w.stack.url, api_key=API_KEY)
    sid = service.create_lora_training_client(base_model=BASE_MODEL, rank=1).result().get_info().model_id.split(":train:")[0]
    resolve(call(service)("interrupted", "test"))
    found = w.rest.search_sessions(types.SessionSearchRequest(session_id=sid)).result().sessions
    assert [s.status.type for s in found] == ["client_finished"] and found[0].status.reason.type == "interrupted"
    r = w.http.post("/session_heartbeat", json={"session_id": sid}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 410, r.text


# ---------------------------------------------------------------------- TrainingClient


def training_forward(w, call):
    out = call(w.tc)(w.data, "cross_entropy")
    assert len(out.loss_fn_outputs) == len(w.data) and out.metrics["loss:sum"] > 0
    assert_same([o["logprobs"].to_numpy() for o in out.loss_fn_outputs], w.forward())  # forward changes nothing


def training_forward_backward(w, call):
    before = w.forward()
    out = call(w.tc)(w.data, "cross_entropy")
    expected = -sum(float((lp * d.loss_fn_inputs["weights"].to_numpy()).sum()) for lp, d in zip(before, w.data))
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    w.tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    assert_differ(w.forward(), before)


def training_forward_backward_custom(w, call):
    import torch

    def loss_fn(data, logprobs_list):
        loss = sum(-(lp * torch.tensor(d.loss_fn_inputs["weights"].to_numpy())).sum() for d, lp in zip(data, logprobs_list))
        return loss, {"custom:sum": float(loss)}

    builtin = w.tc.forward(w.data, "cross_entropy").result().metrics["loss:sum"]
    out = call(w.tc)(w.data, loss_fn)
    assert out.metrics["loss:sum"] == pytest.approx(builtin, rel=1e-4)
    w.tc.optim_step(types.AdamParams(learning_rate=0.0)).result()


def training_optim_step(w, call):
    before = w.forward()
    w.tc.forward_backward(w.data, "cross_entropy").result()
    resp = call(w.tc)(types.AdamParams(learning_rate=2e-2))
    assert isinstance(resp, types.OptimStepResponse)
    assert_differ(w.forward(), before)


def training_save_state(w, call):
    name = w.name("saved")
    path = call(w.tc)(name, user_metadata={"step": "7"}).path
    assert path == f"tinker://{w.tc.get_info().model_id}/weights/{name}"
    listed = {c.tinker_path: c for c in w.rest.list_checkpoints(w.tc.get_info().model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "training" and listed[path].user_metadata == {"step": "7"} and listed[path].size_bytes > 0


def _load(w, call):
    path = w.state()
    before = w.forward()
    w.step()
    assert_differ(w.forward(), before)
    resp = call(w.tc)(path)
    assert resp.path == path
    assert_same(w.forward(), before)


training_load_state = _load
training_load_state_with_optimizer = _load


def training_save_weights_for_sampler(w, call):
    name = w.name("for-sampler")
    path = call(w.tc)(name).path
    assert path == f"tinker://{w.tc.get_info().model_id}/sampler_weights/{name}"
    assert w.greedy(w.service.create_sampling_client(model_path=path).result()) == w.greedy(w.tc.save_weights_and_get_sampling_client().result())


def training_save_weights_and_get_sampling_client(w, call):
    sc = resolve(call(w.tc)())
    prompt_lp = sc.compute_logprobs(w.prompt).result()
    assert prompt_lp[0] is None and len(prompt_lp) == w.prompt.length


def training_save_weights_external(w, call):
    name = w.name("export")
    resp = call(w.tc)(name)
    assert resp.path == f"tinker://{w.tc.get_info().model_id}/external_weights/{name}"
    listed = {c.tinker_path: c for c in w.user_checkpoints()}
    assert listed[resp.path].checkpoint_type == "external" and listed[resp.path].size_bytes > 0


def training_create_sampling_client(w, call):
    path = w.sampler_path()
    sc = resolve(call(w.tc)(path))
    assert sc.get_base_model() == BASE_MODEL and len(w.greedy(sc)) > 0


def training_get_info(w, call):
    info = call(w.tc)()
    assert info.model_id.startswith(w.session_id) and info.lora_rank == 4 and info.model_data.model_name == BASE_MODEL


def training_get_tokenizer(w, call):
    tok = call(w.tc)()
    ids = tok.encode("hello world")
    assert ids and tok.decode(ids) == "hello world"


def training_get_console_url(w, call):
    assert w.tc.get_info().model_id in call(w.tc)()


def training_get_telemetry(w, call):
    assert call(w.tc)() is None


# ---------------------------------------------------------------------- SamplingClient


def sampling_sample(w, call):
    sc = w.tc.save_weights_and_get_sampling_client().result()
    resp = call(sc)(w.prompt, 3, types.SamplingParams(max_tokens=5, temperature=1.0, seed=1))
    assert len(resp.sequences) == 3 and all(1 <= len(s.tokens) <= 5 and len(s.logprobs) == len(s.tokens) for s in resp.sequences)


def sampling_compute_logprobs(w, call):
    sc = w.tc.save_weights_and_get_sampling_client().result()
    lps = call(sc)(w.prompt)
    assert len(lps) == w.prompt.length and lps[0] is None and all(x is not None and x <= 0 for x in lps[1:])


def sampling_create(w, call):
    sc = resolve(tinker.SamplingClient.create(w.service.holder, base_model=BASE_MODEL))
    assert sc.get_base_model() == BASE_MODEL and len(w.greedy(sc)) > 0


def sampling_from_sampler_handle(w, call):
    sc = w.tc.create_sampling_client(w.sampler_path()).result()
    copy = tinker.SamplingClient.from_sampler_handle(sc.get_sampler_handle(), api_key=API_KEY)
    assert w.greedy(copy) == w.greedy(sc)


def sampling_get_sampler_handle(w, call):
    sc = w.tc.save_weights_and_get_sampling_client().result()
    handle = call(sc)()
    assert isinstance(handle, str) and w.greedy(tinker.SamplingClient.from_sampler_handle(handle, api_key=API_KEY)) == w.greedy(sc)


def sampling_get_base_model(w, call):
    assert call(w.service.create_sampling_client(base_model=BASE_MODEL).result())() == BASE_MODEL
    assert call(w.tc.create_sampling_client(w.sampler_path()).result())() == BASE_MODEL  # asks the server (GET samplers/{id})


def sampling_get_tokenizer(w, call):
    tok = call(w.tc.save_weights_and_get_sampling_client().result())()
    assert tok.decode(tok.encode("two words")) == "two words"


def sampling_on_queue_state_change(w, call):
    from tinker.lib.api_future_impl import QueueState

    sc = w.tc.save_weights_and_get_sampling_client().result()
    assert call(sc)(QueueState.PAUSED_CAPACITY, "busy") is None
    assert call(sc)(QueueState.ACTIVE, None) is None
    assert len(w.greedy(sc)) > 0  # still samples


def sampling_get_telemetry(w, call):
    assert call(w.tc.save_weights_and_get_sampling_client().result())() is None


# ---------------------------------------------------------------------- RestClient and AdminClient


def rest_get_server_capabilities(w, call):
    names = [m.model_name for m in call(w.rest)().supported_models]
    assert BASE_MODEL in names


def rest_get_training_run(w, call):
    model_id = w.tc.get_info().model_id
    path = w.state()
    run = call(w.rest)(model_id)
    assert run.training_run_id == model_id and run.base_model == BASE_MODEL and run.is_lora and run.lora_rank == 4
    assert run.user_metadata == {"run": "surface"} and run.last_checkpoint.tinker_path == path and not run.corrupted
    assert run.last_request_time > datetime.now(timezone.utc) - timedelta(minutes=5)


def rest_get_training_run_by_tinker_path(w, call):
    path = w.sampler_path()
    run = call(w.rest)(path)
    assert run.training_run_id == w.tc.get_info().model_id and run.last_sampler_checkpoint.tinker_path == path


def rest_get_weights_info_by_tinker_path(w, call):
    info = call(w.rest)(w.state())
    assert info.base_model == BASE_MODEL and info.is_lora and info.lora_rank == 4 and info.train_mlp and info.train_attn


def rest_list_training_runs(w, call):
    resp = call(w.rest)(limit=1000)
    ids = [r.training_run_id for r in resp.training_runs]
    assert w.tc.get_info().model_id in ids and resp.cursor.total_count == len(ids)
    assert len(call(w.rest)(limit=1).training_runs) == 1


def rest_list_checkpoints(w, call):
    a, b = w.state(), w.sampler_path()
    listed = [c.tinker_path for c in call(w.rest)(w.tc.get_info().model_id).checkpoints]
    assert listed.index(b) < listed.index(a)  # newest first


def rest_list_user_checkpoints(w, call):
    path = w.state()
    resp = call(w.rest)(limit=1000)
    assert resp.checkpoints[0].tinker_path == path
    times = [c.time for c in resp.checkpoints]
    assert times == sorted(times, reverse=True) and resp.cursor.total_count == len(times)


def rest_delete_checkpoint(w, call):
    path = w.state()
    parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    call(w.rest)(parsed.training_run_id, parsed.checkpoint_id)
    assert path not in [c.tinker_path for c in w.user_checkpoints()]
    with pytest.raises(tinker.NotFoundError):
        w.rest.get_weights_info_by_tinker_path(path).result()


def rest_delete_checkpoint_from_tinker_path(w, call):
    path = w.sampler_path()
    call(w.rest)(path)
    assert path not in [c.tinker_path for c in w.user_checkpoints()]


def rest_publish_checkpoint_from_tinker_path(w, call):
    path = w.state()
    with pytest.raises(tinker.NotFoundError):
        w.other.get_weights_info_by_tinker_path(path).result()
    call(w.rest)(path)
    assert w.other.get_weights_info_by_tinker_path(path).result().lora_rank == 4
    assert {c.tinker_path: c.public for c in w.user_checkpoints()}[path]


def rest_unpublish_checkpoint_from_tinker_path(w, call):
    path = w.state()
    w.rest.publish_checkpoint_from_tinker_path(path).result()
    call(w.rest)(path)
    with pytest.raises(tinker.NotFoundError):
        w.other.get_weights_info_by_tinker_path(path).result()


def rest_set_checkpoint_ttl_from_tinker_path(w, call):
    path = w.state()
    call(w.rest)(path, 7200)
    expires = {c.tinker_path: c.expires_at for c in w.user_checkpoints()}[path]
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() - 7200) < 120
    call(w.rest)(path, None)
    assert {c.tinker_path: c.expires_at for c in w.user_checkpoints()}[path] is None


def rest_get_external_weights_urls(w, call):
    path = w.tc.save_weights_external(w.name("urls")).result().path
    resp = call(w.rest)(path)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(resp.urls)
    assert timedelta(minutes=50) < resp.expires - datetime.now(timezone.utc) < timedelta(minutes=61)
    size = {c.tinker_path: c.size_bytes for c in w.user_checkpoints()}[path]
    got = {name: httpx.get(url, timeout=60) for name, url in resp.urls.items()}  # no API key
    assert all(r.status_code == 200 for r in got.values()) and sum(len(r.content) for r in got.values()) == size
    assert json.loads(got["adapter_config.json"].content)["r"] == 4
    tampered = resp.urls["adapter_model.safetensors"].replace("adapter_model", "adapter_modez")
    assert httpx.get(tampered, timeout=60).status_code == 403


def rest_copy_weights(w, call):
    source = w.state()
    before = w.forward()
    copied = call(w.rest)(source, "copies")
    assert copied != source and w.rest.get_weights_info_by_tinker_path(copied).result().lora_rank == 4
    w.rest.delete_checkpoint_from_tinker_path(source).result()  # the copy has bytes of its own
    w.step()
    tc = w.service.create_training_client_from_state(copied).result()
    assert_same(w.forward(tc), before)
    run = types.ParsedCheckpointTinkerPath.from_tinker_path(copied).training_run_id
    step = {"model_id": run, "seq_id": 1, "adam_params": {"learning_rate": 0.1}}
    r = w.http.post("/optim_step", json=step, headers={"X-API-Key": API_KEY})
    assert r.status_code == 400 and "cannot be trained" in r.json()["detail"], r.text  # the copy's run only holds it


def rest_get_session(w, call):
    sc = w.tc.save_weights_and_get_sampling_client().result()
    resp = call(w.rest)(w.session_id)
    assert w.tc.get_info().model_id in resp.training_run_ids and resp.user_metadata == {"suite": "surface"}
    assert w.session_id + ":sample:" in " ".join(resp.sampler_ids) and len(w.greedy(sc)) > 0


def rest_list_sessions(w, call):
    assert w.session_id in call(w.rest)(limit=1000).sessions


def rest_assign_session_project(w, call):
    project = w.name("project")
    call(w.rest)(w.session_id, project)
    found = w.rest.search_sessions(types.SessionSearchRequest(project_ids=[project])).result().sessions
    assert [s.session_id for s in found] == [w.session_id] and found[0].project_id == project


def rest_export_session_trace(w, call):
    w.step()
    w.greedy(w.tc.save_weights_and_get_sampling_client().result())
    url = call(w.rest)(w.session_id)
    r = httpx.get(url, timeout=60)  # no API key
    assert r.status_code == 200, r.text
    trace = r.json()
    reqs = trace["otherData"]["requests"]
    assert trace["otherData"]["session_id"] == w.session_id and len(trace["traceEvents"]) == len(reqs)
    done = {q["type"] for q in reqs if q["state"] == "done" and q["finished_at"] > 0}
    assert {"CreateModel", "ForwardBackward", "OptimStep", "SaveWeightsForSampler", "Sample"} <= done, done
    trained = [q for q in reqs if q["track"] == w.tc.get_info().model_id and q["state"] == "done"]  # submitted and finished
    assert len(trained) >= 3 and all(q["finished_at"] >= q["created_at"] > 0 for q in trained)
    assert all(e["ph"] in ("X", "i") and e.get("dur", 0) >= 0 for e in trace["traceEvents"])
    expires = dict(p.split("=") for p in url.split("?")[1].split("&"))["expires"]
    assert httpx.get(url.replace(f"expires={expires}", f"expires={int(expires) + 1}"), timeout=60).status_code == 403


def rest_search_sessions(w, call):
    w.tc.save_state(w.name("counted")).result()  # at least one checkpoint, whatever ran before
    resp = call(w.rest)(types.SessionSearchRequest(user_metadata={"suite": "surface"}))
    mine = [s for s in resp.sessions if s.session_id == w.session_id]
    assert len(mine) == 1 and mine[0].status.type == "active" and mine[0].checkpoints_count >= 1
    page = call(w.rest)(types.SessionSearchRequest(limit=1))
    if page.next_cursor is not None:  # the cursor moves on, newest first
        nxt = call(w.rest)(types.SessionSearchRequest(limit=1, cursor=page.next_cursor))
        assert nxt.sessions[0].created_at <= page.sessions[0].created_at
        assert nxt.sessions[0].session_id != page.sessions[0].session_id


def rest_get_sampler(w, call):
    path = w.sampler_path()
    sc = w.service.create_sampling_client(model_path=path).result()
    sid = sc._sampling_session_id  # noqa: SLF001 - the id the SDK got from create_sampling_session
    resp = call(w.rest)(sid)
    assert resp.base_model == BASE_MODEL and resp.model_path == path


def rest_whoami(w, call):
    # whoami decodes the JWT the SDK holds in JWT mode, so it needs a gateway with --jwt-auth;
    # against the default gateway (API keys only) the SDK refuses it without a request.
    with pytest.raises(RuntimeError, match="requires JWT auth"):
        call(w.rest)()
    rest = tinker.RestClient(base_url=w.fixture("jwt_gateway"), api_key=API_KEY)
    me, kid = call(rest)(), key_id(API_KEY)
    assert (me.user_urn, me.org_urn, me.email) == (f"openrl:key:{kid}", f"tml:organization:{kid}", None)
    # The JWT is the same tenant as the key: it sees the key's runs, and another key is another.
    assert w.tc.get_info().model_id in [r.training_run_id for r in rest.list_training_runs(limit=1000).result().training_runs]
    them = call(tinker.RestClient(base_url=w.fixture("jwt_gateway"), api_key=OTHER_KEY))()
    assert them.user_urn == f"openrl:key:{key_id(OTHER_KEY)}" != me.user_urn


def rest_get_telemetry(w, call):
    assert call(w.rest)() is None


def admin_target(w, method_owner: str):
    return w.rest if method_owner == "RestClient" else w.admin


def usage_get_audit_log(w, call, owner):
    path = w.state()
    w.rest.publish_checkpoint_from_tinker_path(path).result()
    w.rest.delete_checkpoint_from_tinker_path(path).result()
    entries = call(admin_target(w, owner))("checkpoints").entries
    about = [e.event for e in entries if e.tinker_path == path]
    assert about == ["checkpoint_publish", "checkpoint_delete"], about
    assert all(e.event.startswith("checkpoint_") for e in entries)
    everything = call(admin_target(w, owner))().entries
    assert any(e.event == "session_create" and e.event_details["session_id"] == w.session_id for e in everything)
    assert [e.timestamp for e in everything] == sorted(e.timestamp for e in everything)
    theirs = AdminClient(base_url=w.stack.url, api_key=OTHER_KEY).get_audit_log("all").result().entries
    assert not [e for e in theirs if e.tinker_path == path or e.event_details.get("session_id") == w.session_id]


def usage_get_billing_usage(w, call, owner):
    # A fresh session whose work is known exactly: one forward_backward, one sample request.
    service = tinker.ServiceClient(base_url=w.stack.url, api_key=API_KEY, user_metadata={"billing": owner})
    tc = service.create_lora_training_client(base_model=BASE_MODEL, rank=2).result()
    sid = tc.get_info().model_id.split(":train:")[0]
    tc.forward_backward(w.data, "cross_entropy").result()
    sampled = tc.save_weights_and_get_sampling_client().result().sample(w.prompt, 2, types.SamplingParams(max_tokens=5, seed=1)).result()
    now = datetime.now(timezone.utc)
    want = {
        "training": sum(d.model_input.length for d in w.data),
        "sampling_prefill": w.prompt.length,
        "sampling_sample": sum(len(s.tokens) for s in sampled.sequences),
    }
    # Workers publish usage records right after the result (accounting never delays or
    # fails the work), so billing may lag a result by a moment: read until it has them.
    deadline = time.monotonic() + 15
    while True:
        resp = call(admin_target(w, owner))(now - timedelta(days=1), now + timedelta(hours=1))
        tokens = {}
        for e in resp.data:
            if e.session_id == sid:
                assert e.user_id and e.base_model == BASE_MODEL and e.bucket_end - e.bucket_start == timedelta(hours=1)
                tokens[e.event_info.type] = tokens.get(e.event_info.type, 0) + e.event_info.token_count
        if tokens == want or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert tokens == want, tokens
    assert resp.sessions[sid].user_metadata == {"billing": owner}
    raw = w.http.get("/billing/usage/events", params={"starting_on": (now - timedelta(hours=1)).isoformat(), "ending_before": (now + timedelta(hours=1)).isoformat()},
                     headers={"X-API-Key": API_KEY}).json()  # fmt: skip
    seconds = {e["event_info"]["type"]: e["event_info"]["worker_seconds"] for e in raw["data"] if e["session_id"] == sid}
    assert seconds["training"] > 0 and seconds["sampling_sample"] > 0, seconds  # worker-seconds, beyond Tinker's schema
    theirs = AdminClient(base_url=w.stack.url, api_key=OTHER_KEY).get_billing_usage(now - timedelta(days=1), now + timedelta(hours=1)).result()
    assert sid not in {e.session_id for e in theirs.data}


def usage_get_current_checkpoint_storage_usage(w, call, owner):
    w.state()
    resp = call(admin_target(w, owner))()
    total = sum(c.size_bytes or 0 for c in w.user_checkpoints())
    assert sum(d.size_bytes for d in resp.data) == total > 0
    assert sum(d.checkpoint_count for d in resp.data) == len(w.user_checkpoints())


def usage_get_telemetry(w, call, owner):
    assert call(admin_target(w, owner))() is None


# ---------------------------------------------------------------------- the table


def _table() -> dict:
    table = {}
    prefixes = {"ServiceClient": "service_", "TrainingClient": "training_", "SamplingClient": "sampling_", "RestClient": "rest_"}
    for cname, prefix in prefixes.items():
        for fname, fn in globals().items():
            if fname.startswith(prefix) and callable(fn):
                table[f"{cname}.{fname[len(prefix):]}"] = fn
    table["ServiceClient.create_training_client_from_state_with_optimizer"] = service_create_training_client_from_state
    for fname, fn in list(globals().items()):
        if fname.startswith("usage_"):
            method = fname[len("usage_") :]
            for cname in ("RestClient", "AdminClient"):
                table[f"{cname}.{method}"] = lambda w, call, fn=fn, cname=cname: fn(w, call, cname)
    return table


TABLE = _table()


def test_every_method_is_in_the_table():
    methods = public_methods()
    assert len(methods) >= 100, methods  # 107 in tinker 0.38.0
    missing = sorted({base_name(m) for m in methods} - set(TABLE))
    assert not missing, f"SDK methods the surface table does not handle: {missing}"
    stale = sorted(set(NOT_YET) - {base_name(m) for m in methods})
    assert not stale, f"NOT_YET names methods the SDK no longer has: {stale}"


def _params():
    for method in public_methods():
        reason = NOT_YET.get(base_name(method))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        yield pytest.param(method, marks=marks, id=method)


@pytest.mark.parametrize("method", list(_params()))
def test_method(world, method, request):
    entry = TABLE.get(base_name(method))
    assert entry is not None, f"{method} is not in the table"
    world.fixture = request.getfixturevalue  # for the few entries that need more than the stack
    entry(world, via(method.split(".", 1)[1]))
