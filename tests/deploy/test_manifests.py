"""Kubernetes manifests: every overlay renders with `kubectl kustomize`, every object validates against
the bundled Kubernetes JSON schemas (kubernetes-validate, strict, offline), and the facts the system
relies on hold: probes, one HPA per Deployment, the headless encoder Service, Prometheus annotations,
ConfigMaps equal to configs/*.yaml, commands that the real CLIs accept. No cluster is involved.
"""

from __future__ import annotations

import re

import kubernetes_validate
import pytest

from tests.deploy.conftest import (
    OVERLAYS,
    REPO,
    check_command,
    flag,
    http_port,
    main_container,
    objects,
    render,
)

# Oldest Kubernetes the manifests promise to work on, and the newest the schemas know.
K8S_VERSIONS = ("1.29", "1.37")
ROLES = {"encode-server": "encode", "language-server": "language"}


@pytest.fixture(params=OVERLAYS)
def objs(request) -> tuple[dict, ...]:
    return render(f"overlays/{request.param}")


@pytest.mark.parametrize("tree", ["base", *(f"overlays/{o}" for o in OVERLAYS)])
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_kubernetes_schema(tree, version):
    errors = []
    for o in render(tree):
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{o['kind']}/{o['metadata']['name']} at {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(e.message)
    assert not errors, "\n".join(errors)


def test_both_roles_are_separate_deployments_with_their_own_hpa(objs):
    deps, hpas = objects(objs, "Deployment"), objects(objs, "HorizontalPodAutoscaler")
    assert set(deps) == set(ROLES)
    targets = sorted(h["spec"]["scaleTargetRef"]["name"] for h in hpas.values())
    assert targets == sorted(ROLES), "exactly one HPA per Deployment"
    for h in hpas.values():
        ref = h["spec"]["scaleTargetRef"]
        assert (h["apiVersion"], ref["apiVersion"], ref["kind"]) == (
            "autoscaling/v2",
            "apps/v1",
            "Deployment",
        )
        assert 1 <= h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
        assert h["spec"]["metrics"], "an HPA needs at least one metric"


def test_probes_ready_and_health_on_the_http_port(objs):
    for dep in objects(objs, "Deployment").values():
        c = main_container(dep)
        names = {p["name"] for p in c["ports"]}
        for probe, path in (
            ("readinessProbe", "/ready"),
            ("livenessProbe", "/health"),
            ("startupProbe", "/ready"),
        ):
            get = c[probe]["httpGet"]
            assert get["path"] == path, (dep["metadata"]["name"], probe)
            assert get["port"] in names | {http_port(c)}, (dep["metadata"]["name"], probe)


def test_prometheus_scrapes_metrics_on_the_http_port(objs):
    for dep in objects(objs, "Deployment").values():
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true"
        assert ann["prometheus.io/path"] == "/metrics"
        assert ann["prometheus.io/port"] == str(http_port(main_container(dep)))


def test_services_headless_encoders_and_openai_endpoint_on_30000(objs):
    deps, svcs = objects(objs, "Deployment"), objects(objs, "Service")
    enc, lang = svcs["deepsplit-encode-headless"], svcs["deepsplit-language"]
    assert enc["spec"]["clusterIP"] == "None"
    assert lang["spec"].get("type", "ClusterIP") == "ClusterIP" and lang["spec"].get("clusterIP") != "None"
    assert [p["port"] for p in lang["spec"]["ports"]] == [30000]
    for svc, dep in ((enc, deps["encode-server"]), (lang, deps["language-server"])):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), "Service must select its role's pods"
        others = [d for d in deps.values() if d is not dep]
        assert all(
            not svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            for d in others
        ), "Service must not select the other role"
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
        assert http_port(main_container(dep)) == svc["spec"]["ports"][0]["port"]


def test_configmaps_are_the_repo_configs(objs):
    maps = objects(objs, "ConfigMap")
    for dep in objects(objs, "Deployment").values():
        c = main_container(dep)
        vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/etc/deepsplit"]
        cm = maps[vols[mount["name"]]["configMap"]["name"]]
        config = flag(c["args"], "--config")
        assert config.startswith("/etc/deepsplit/")
        key = config.removeprefix("/etc/deepsplit/")
        assert cm["data"][key] == (REPO / "configs" / key).read_text(), (
            f"ConfigMap {key} differs from configs/{key}: run deploy/sync-configs.sh"
        )


def test_base_config_copies_match_configs():
    for name in ("encode.yaml", "language.yaml"):
        copy = REPO / "deploy" / "base" / "configs" / name
        assert copy.read_text() == (REPO / "configs" / name).read_text(), (
            f"{copy} is stale: run deploy/sync-configs.sh"
        )


def test_commands_use_real_programs_flags_and_ports(objs):
    problems = []
    for dep in objects(objs, "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            problems += check_command(c["args"])
            env = {e["name"] for e in c.get("env", [])}
            problems += [
                f"{c['name']}: $({v}) is not in env"
                for v in re.findall(r"\$\((\w+)\)", " ".join(c["args"]))
                if v not in env
            ]
        c = main_container(dep)
        assert c["args"][0] == dep["metadata"]["name"]
        assert flag(c["args"], "--host") == "0.0.0.0"
        assert int(flag(c["args"], "--port")) == http_port(c)
    assert not problems, "\n".join(problems)


def test_every_container_has_requests_and_limits(objs):
    for dep in objects(objs, "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)
