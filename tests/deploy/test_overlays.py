"""What each overlay adds on top of the base: where the model comes from (cpu-dev: an initContainer
writes the tiny checkpoint into an emptyDir; gpu-rdma: a PVC), how language servers find encoders
(the headless Service by DNS), and gpu-rdma's GPUs, RDMA devices, memory pinning and Mooncake.
"""

from __future__ import annotations

import pytest

from tests.deploy.conftest import OVERLAYS, flag, main_container, objects, render

SOURCES = ("emptyDir", "persistentVolumeClaim", "configMap", "hostPath", "secret")


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_dir_is_on_a_filled_volume(overlay):
    objs = render(f"overlays/{overlay}")
    pvcs = objects(objs, "PersistentVolumeClaim")
    for dep in objects(objs, "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        c = main_container(dep)
        assert flag(c["args"], "--model") == "$(MODEL_DIR)"
        model_dir = env_of(c)["MODEL_DIR"]["value"]
        (mount,) = [m for m in c["volumeMounts"] if model_dir.startswith(m["mountPath"].rstrip("/") + "/")]
        (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        assert len([k for k in vol if k in SOURCES]) == 1, f"volume {vol} must have exactly one source"
        if "persistentVolumeClaim" in vol:
            assert vol["persistentVolumeClaim"]["claimName"] in pvcs
        else:
            writers = [i for i in spec.get("initContainers", []) if flag(i["args"], "--out") == model_dir]
            assert writers, f"nothing writes {model_dir} into the emptyDir"
            assert any(m["name"] == vol["name"] for m in writers[0]["volumeMounts"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_language_servers_find_encoders_through_the_headless_service(overlay):
    objs = render(f"overlays/{overlay}")
    lang = main_container(objects(objs, "Deployment")["language-server"])
    host, port = flag(lang["args"], "--encoder-dns").rsplit(":", 1)
    name, ns, rest = host.split(".", 2)
    assert (ns, rest) == ("$(POD_NAMESPACE)", "svc.cluster.local")
    assert env_of(lang)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    svc = objects(objs, "Service")[name]
    assert svc["spec"]["clusterIP"] == "None"
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]
    assert flag(lang["args"], "--mode") == "disaggregated"


def test_cpu_dev_runs_zmq_on_cpu():
    for dep in objects(render("overlays/cpu-dev"), "Deployment").values():
        c = main_container(dep)
        assert not any("gpu" in r or "rdma" in r for r in c["resources"]["limits"])
        assert not dep["spec"]["template"]["spec"].get("hostNetwork")
        assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    lang = main_container(objects(render("overlays/cpu-dev"), "Deployment")["language-server"])
    assert env_of(lang)["TRANSFER_BACKEND"]["value"] == "zmq"


def test_gpu_rdma_has_gpus_rdma_and_mooncake_over_rdma():
    objs = render("overlays/gpu-rdma")
    for dep in objects(objs, "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        c = main_container(dep)
        limits = c["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert any(k.startswith("rdma/") for k in limits), "an RDMA device resource"
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
        assert flag(c["args"], "--mooncake-protocol") == "rdma"
        assert flag(c["args"], "--mooncake-device") == "$(MOONCAKE_DEVICE)"
        assert env_of(c)["MOONCAKE_DEVICE"]["value"]
    lang = main_container(objects(objs, "Deployment")["language-server"])
    assert flag(lang["args"], "--transfer-backend") == "$(TRANSFER_BACKEND)"
    assert env_of(lang)["TRANSFER_BACKEND"]["value"] == "mooncake"
    pvc = objects(objs, "PersistentVolumeClaim")["deepsplit-models"]
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
