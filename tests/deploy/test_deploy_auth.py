"""deploy/: the bus is closed on Kubernetes too. Every OpenRL container connects as its own
NATS role with credentials from Secrets (never a literal), trusting the server's CA; the
operator's credentials reach only the gateway's bus-init step; the NetworkPolicy in the NATS
namespace admits OpenRL's pods (and nothing else) to the client port; the Ingress serves TLS.
Rendered with kustomize, offline, like test_deploy_manifests.py."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
import yaml

from openrl.bus import auth
from rendering import DEPLOY, OVERLAYS, containers, data_of, find, nats_values, one, pod_labels, render, selects  # noqa: F401 - render is a fixture

ROLE_OF = {"gateway": "gateway", "trainer": "trainer", "sampler": "sampler", "rewarder": "rewarder", "bus-init": "operator"}
NATS_POLICY = yaml.safe_load((DEPLOY / "nats" / "networkpolicy.yaml").read_text())


def nats_env(c) -> dict[str, dict]:
    return {e["name"]: e for e in c.spec.get("env", []) if e["name"].startswith("OPENRL_NATS_")}


@pytest.mark.parametrize("overlay", [*OVERLAYS, "custom-reward"])
def test_each_container_connects_as_its_own_role_from_secrets(render, overlay):
    objs = render(OVERLAYS[overlay] if overlay in OVERLAYS else DEPLOY / "examples" / "custom-reward")
    generated = {s["metadata"]["name"]: s for s in find(objs, "Secret")}
    seen = set()
    for c in containers(objs):
        sub = c.openrl_subcommand
        if sub not in ROLE_OF:
            assert not nats_env(c), f"{c.where}: holds NATS credentials it does not use"
            continue
        role = ROLE_OF[sub]
        seen.add(role)
        env = nats_env(c)
        refs = {k: e["valueFrom"]["secretKeyRef"] for k, e in env.items()}  # KeyError: a literal, not a Secret
        assert set(refs) == {"OPENRL_NATS_USER", "OPENRL_NATS_PASSWORD", "OPENRL_NATS_CA"}, f"{c.where}: {set(env)}"
        secret = refs["OPENRL_NATS_PASSWORD"]["name"]
        assert secret.startswith(f"openrl-nats-{role}") and refs["OPENRL_NATS_USER"]["name"] == secret, f"{c.where}: {secret}"
        assert refs["OPENRL_NATS_CA"] == {"name": "openrl-nats-ca", "key": "ca.crt", "optional": True}
        if secret in generated:  # dev-cpu's public dev passwords: still NATS-safe ones
            data = data_of(generated[secret])
            assert data["user"] == role and data["password"][0].isalpha(), f"{secret}: {data}"
    if overlay != "custom-reward":
        assert seen == set(auth.ROLES)
    # the operator's credentials are in the one step that needs them
    holders = [c.where for c in containers(objs) if any(
        e.get("valueFrom", {}).get("secretKeyRef", {}).get("name", "").startswith("openrl-nats-operator") for e in c.spec.get("env", []))]
    assert all("bus-init" in w for w in holders), holders


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_the_url_scheme_matches_the_servers_tls(render, overlay):
    url = urlparse(data_of(one(render(OVERLAYS[overlay]), "ConfigMap", "openrl-common"))["OPENRL_NATS_URL"])
    assert url.scheme == ("tls" if nats_values(overlay)["config"]["nats"]["tls"]["enabled"] else "nats")


def _admits(rule: dict, namespace: str, labels: dict) -> bool:
    for peer in rule.get("from", []):
        ns = peer.get("namespaceSelector")
        if ns is None and namespace != "nats":
            continue  # a bare podSelector means the policy's own namespace
        if ns is not None and not selects(ns, {"kubernetes.io/metadata.name": namespace}):
            continue
        if "podSelector" in peer and not selects(peer["podSelector"], labels):
            continue
        return True
    return False


def _client_rules() -> list[dict]:
    return [r for r in NATS_POLICY["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {4222}]


def test_the_nats_namespace_admits_only_openrl_to_the_client_port():
    p = NATS_POLICY
    assert p["kind"] == "NetworkPolicy" and p["metadata"]["namespace"] == "nats" and p["spec"]["policyTypes"] == ["Ingress"]
    server = {"app.kubernetes.io/name": "nats", "app.kubernetes.io/component": "nats", "app.kubernetes.io/instance": "nats"}
    assert selects(p["spec"]["podSelector"], server)
    (rule,) = _client_rules()
    assert not _admits(rule, "default", {"app": "anything"})
    assert not _admits(rule, "openrl", {"app.kubernetes.io/name": "intruder"})  # in openrl's namespace, not one of its pods
    assert not _admits(rule, "other", {"app.kubernetes.io/part-of": "openrl"})  # openrl's label, another namespace
    assert _admits(rule, "nats", {"app.kubernetes.io/component": "nats-box", "app.kubernetes.io/name": "nats"})
    for r in p["spec"]["ingress"]:  # the other ports: routes and monitoring, never the client port
        assert 4222 not in {pt["port"] for pt in r["ports"]} or r is rule
        assert r.get("from"), "a rule without peers admits everyone"


@pytest.mark.parametrize("overlay", list(OVERLAYS))
def test_every_openrl_pod_that_talks_to_nats_is_admitted(render, overlay):
    objs = render(OVERLAYS[overlay])
    (rule,) = _client_rules()
    talkers = [c for c in containers(objs) if c.openrl_subcommand in ROLE_OF]  # LeaderWorkerSet templates included
    assert talkers
    for c in talkers:
        assert _admits(rule, c.workload["metadata"].get("namespace", "openrl"), pod_labels(c.workload)), c.where


def test_the_nats_policy_is_a_valid_object():
    import kubernetes_validate

    for version in ("1.29", "1.33"):
        kubernetes_validate.validate(NATS_POLICY, version, strict=True)


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "dev-cpu"])
def test_the_ingress_serves_tls_for_its_hosts(render, overlay):
    for ing in find(render(OVERLAYS[overlay]), "Ingress"):
        hosts = {r["host"] for r in ing["spec"]["rules"]}
        covered = {h for t in ing["spec"].get("tls", []) for h in t["hosts"] if t.get("secretName")}
        assert hosts and hosts <= covered, f"{overlay}: {hosts - covered} served without TLS"
        assert ing["metadata"]["annotations"].get("nginx.ingress.kubernetes.io/force-ssl-redirect") == "true"


def test_the_certificate_covers_the_client_url():
    docs = list(yaml.safe_load_all((DEPLOY / "nats" / "certificate.yaml").read_text()))
    (cert,) = [d for d in docs if d["kind"] == "Certificate" and d["spec"]["secretName"] == "nats-server-tls"]
    assert nats_values("gpu")["config"]["nats"]["tls"]["secretName"] == "nats-server-tls"
    base = yaml.safe_load((DEPLOY / "kustomize" / "base" / "kustomization.yaml").read_text())
    url = next(x for x in base["configMapGenerator"][0]["literals"] if x.startswith("OPENRL_NATS_URL="))
    assert urlparse(url.split("=", 1)[1]).hostname in cert["spec"]["dnsNames"]


def test_the_operator_made_secrets_are_documented():
    readme = (DEPLOY / "README.md").read_text()
    for name in ("openrl-nats-$role", "openrl-nats-users", "openrl-nats-ca", "openrl-gateway-tls", "values-auth.yaml", "networkpolicy.yaml"):
        assert name in readme, name
