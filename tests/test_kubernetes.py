"""deploy/kubernetes, checked offline: the fields that must agree with trio-swap itself.

No cluster and no network: the manifests are parsed as kustomize would
assemble them (the ConfigMap built from its generator), and each field that
matters is checked against trio-swap's own behaviour: probe paths that
trio-swap really answers (a server started with the ConfigMap's config and
the manifest's ``--listen``), a grace period longer than the longest stop the
config allows, the config path under the ConfigMap's mount, and so on. With
``kubernetes-validate`` installed (``pip install kubernetes-validate``: it
bundles the schemas), every resource is also validated against the Kubernetes
API schema; without it that one test is skipped.

The kubelet updates a mounted ConfigMap by switching a ``..data`` symlink to a
new timestamped directory; the last tests do exactly that under a running
``--watch-config`` trio-swap.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from functools import cache, partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from tests.conftest import chat, free_port, running, wait_for
from trio_swap.config.load import load_config
from trio_swap.http.hosts import HostPolicy
from trio_swap.reload import watch_config_file
from trio_swap.server import RunningServer, serve

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "kubernetes"
#: serve() gives stop_all this much beyond the longest unloadTimeout (server.py).
STOP_MARGIN = 5.0

Resource = dict[str, Any]


@cache
def _kustomization() -> Resource:
    document: Resource = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return document


def _generated_configmaps() -> Iterator[Resource]:
    """The ConfigMaps kustomize's configMapGenerator builds (without a hash suffix)."""
    assert _kustomization()["generatorOptions"]["disableNameSuffixHash"] is True
    for generator in _kustomization()["configMapGenerator"]:
        data = {Path(file).name: (BASE / file).read_text() for file in generator["files"]}
        yield {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": generator["name"]},
            "data": data,
        }


@cache
def _resources() -> tuple[Resource, ...]:
    """Every resource of the base, in the kustomization's namespace."""
    found: list[Resource] = []
    for file in _kustomization()["resources"]:
        found.extend(d for d in yaml.safe_load_all((BASE / file).read_text()) if d)
    found.extend(_generated_configmaps())
    namespace = _kustomization()["namespace"]
    for resource in found:
        if resource["kind"] != "Namespace":
            resource["metadata"].setdefault("namespace", namespace)
    return tuple(found)


def _one(kind: str) -> Resource:
    matching = [r for r in _resources() if r["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def _pod() -> Resource:
    spec: Resource = _one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container() -> Resource:
    containers = _pod()["containers"]
    assert len(containers) == 1
    container: Resource = containers[0]
    return container


def _option(name: str) -> str:
    args: list[str] = _container()["args"]
    return args[args.index(name) + 1]


def _container_port(port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in _container()["ports"] if p["name"] == port]
    return int(number)


def _listen_port() -> int:
    return int(_option("--listen").rsplit(":", 1)[1])


def _config_file() -> Path:
    """The config.yaml the ConfigMap is generated from (what the pod reads)."""
    return BASE / Path(_option("--config")).name


# -- structure ---------------------------------------------------------------------


def test_every_file_parses_and_every_resource_is_named() -> None:
    listed = set(_kustomization()["resources"])
    generated = {f for g in _kustomization()["configMapGenerator"] for f in g["files"]}
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed | generated, "a file the kustomization does not use"
    for path in BASE.glob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path
    for resource in _resources():
        assert resource["apiVersion"] and resource["kind"] and resource["metadata"]["name"]
    assert _one("Namespace")["metadata"]["name"] == _kustomization()["namespace"]


def test_one_trio_swap_per_gpu_node_with_the_gpus_requested() -> None:
    daemonset = _one("DaemonSet")
    assert daemonset["apiVersion"] == "apps/v1"
    assert any("gpu" in label for label in _pod()["nodeSelector"])
    resources = _container()["resources"]
    gpus = resources["limits"]["nvidia.com/gpu"]
    # Extended resources: the request, if given, must equal the limit.
    assert isinstance(gpus, int) and gpus >= 1
    assert resources["requests"]["nvidia.com/gpu"] == gpus


def test_selectors_match_the_pod_labels() -> None:
    daemonset = _one("DaemonSet")
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = _one("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None"  # headless: every node by itself
    (port,) = service["spec"]["ports"]
    assert _container_port(port["targetPort"]) == _listen_port()
    assert _pod()["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]


def test_probes_and_scrape_annotations_point_at_the_container_port() -> None:
    container = _container()
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert _container_port(container[probe]["httpGet"]["port"]) == _listen_port()
    assert [p["containerPort"] for p in container["ports"]] == [_listen_port()]
    annotations = _one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _listen_port()
    assert annotations["prometheus.io/path"] == "/metrics"
    assert _option("--listen").startswith("0.0.0.0:")  # the pod IP must reach it


async def test_trio_swap_answers_the_probe_and_scrape_paths_as_the_kubelet_asks() -> None:
    # The ConfigMap's own config, listening where the manifest says (port aside).
    config = load_config(_config_file())
    host = _option("--listen").rsplit(":", 1)[0]
    container = _container()
    annotations = _one("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    paths = [container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")]
    paths.append(annotations["prometheus.io/path"])
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            server: RunningServer = await nursery.start(
                partial(serve, config, host=host, port=0, handle_signals=False, shutdown_timeout=2)
            )
            port = server.url.rsplit(":", 1)[1]
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                for path in paths:
                    # The kubelet sends the pod IP; Prometheus too (its target).
                    response = await client.get(path, headers={"Host": f"10.244.7.21:{port}"})
                    assert response.status_code == 200, path
            server.stop()


def test_the_config_comes_from_the_configmap_and_is_watched() -> None:
    container = _container()
    assert "--watch-config" in container["args"]
    config_path = Path(_option("--config"))
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    assert "subPath" not in mount  # a subPath mount never sees the kubelet's updates
    assert mount["readOnly"] is True
    (volume,) = [v for v in _pod()["volumes"] if v["name"] == mount["name"]]
    configmap = _one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]


def test_the_configmap_config_loads_and_allows_the_service_names() -> None:
    config = load_config(_config_file())
    assert config.models
    service = _one("Service")["metadata"]
    name, namespace = service["name"], service["namespace"]
    policy = HostPolicy(config.allowed_hosts, listen_host="0.0.0.0", machine_name="node-1")
    port = _listen_port()
    for host in (name, f"{name}.{namespace}", f"{name}.{namespace}.svc.cluster.local"):
        assert policy.allows(f"{host}:{port}".encode()), host
    assert policy.allows(f"10.244.7.21:{port}".encode())  # a pod IP
    assert not policy.allows(f"attacker.example:{port}".encode())


def test_the_grace_period_outlasts_the_longest_stop() -> None:
    config = load_config(_config_file())
    longest_unload = max(m.unload_timeout for m in config.models.values())
    drain = float(_option("--shutdown-timeout"))
    pre_stop = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    stop = float(pre_stop[1]) + drain + longest_unload + STOP_MARGIN
    assert _pod()["terminationGracePeriodSeconds"] > stop


def test_the_pod_runs_as_the_image_s_non_root_user() -> None:
    pod = _pod()["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    user = [
        line
        for line in (ROOT / "Containerfile").read_text().splitlines()
        if line.startswith("USER ")
    ]
    assert user[-1].split()[1].split(":")[0] == str(pod["runAsUser"])
    container = _container()["securityContext"]
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]
    assert container["readOnlyRootFilesystem"] is True
    writable = {m["mountPath"] for m in _container()["volumeMounts"] if not m.get("readOnly")}
    assert _option("--state-dir") in writable and "/tmp" in writable


def test_models_come_from_a_host_path_mounted_where_the_config_looks() -> None:
    (mount,) = [m for m in _container()["volumeMounts"] if m["name"] == "models"]
    assert mount["readOnly"] is True
    (volume,) = [v for v in _pod()["volumes"] if v["name"] == "models"]
    assert volume["hostPath"]["path"]
    config = load_config(_config_file())
    for model in config.models.values():
        assert any(arg.startswith(mount["mountPath"] + "/") for arg in model.cmd), model.id
    assert "persistentVolumeClaim" in (BASE / "daemonset.yaml").read_text()  # the alternative


def test_every_resource_validates_against_the_kubernetes_schemas() -> None:
    validator = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate to check the schemas"
    )
    version = validator.latest_version()
    for resource in _resources():
        validator.validate(resource, version, strict=True)


# -- the kubelet's ConfigMap update, under --watch-config -------------------------------


class KubeletVolume:
    """A directory laid out as the kubelet mounts a ConfigMap, updated as it updates it.

    ``config.yaml -> ..data/config.yaml``, ``..data -> ..<timestamp>``: an update
    writes a new timestamped directory, points a new symlink at it and renames
    that over ``..data`` (atomic), then removes the old directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._generation = 0
        root.mkdir(parents=True)

    def write(self, files: dict[str, str]) -> None:
        self._generation += 1
        stamp = f"..2025_01_01_00_00_{self._generation:02d}.{self._generation:09d}"
        (self.root / stamp).mkdir()
        for name, text in files.items():
            (self.root / stamp / name).write_text(text)
        old = os.readlink(self.root / "..data") if (self.root / "..data").exists() else None
        (self.root / "..data_tmp").symlink_to(stamp)
        os.rename(self.root / "..data_tmp", self.root / "..data")
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(self.root / old)


def _model_config(*names: str) -> str:
    """A config whose models are the responder (standing in for llama-server)."""
    lines = [f"startPort: {free_port()}", "healthCheckTimeout: 30", "models:"]
    lines += _models(*names)
    return "\n".join(lines) + "\n"


def _models(*names: str) -> list[str]:
    command = f"{sys.executable} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}}"
    return [line for name in names for line in (f"  {name}:", f"    cmd: {command}")]


async def test_the_watcher_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path / "trio-swap")
    volume.write({"config.yaml": "models: {}\n"})
    reasons: list[str] = []
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            path = volume.root / "config.yaml"
            await nursery.start(partial(watch_config_file, path, reasons.append, interval=0.01))
            volume.write({"config.yaml": "models: {}\nlogLevel: debug\n"})
            await wait_for(lambda: len(reasons) == 1, what="the swap noticed")
            volume.write({"config.yaml": "models: {}\nlogLevel: debug\n"})  # same content
            volume.write({"config.yaml": "models: {}\nlogLevel: warn\n"})
            await wait_for(lambda: len(reasons) == 2, what="the next swap noticed")
            nursery.cancel_scope.cancel()
    assert reasons == [f"{path} changed"] * 2


async def test_a_configmap_update_reaches_a_running_trio_swap(tmp_path: Path) -> None:
    volume = KubeletVolume(tmp_path / "trio-swap")
    text = _model_config("alpha")
    volume.write({"config.yaml": text})
    path = volume.root / "config.yaml"
    with trio.fail_after(60):
        async with running(load_config(path), config_path=path, watch_config=True) as h:

            async def listed() -> set[str]:
                response = await h.client.get("/v1/models")
                return {row["id"] for row in response.json()["data"]}

            assert await listed() == {"alpha"}
            volume.write({"config.yaml": text + "\n".join(_models("beta")) + "\n"})
            await wait_for(lambda: _has(listed, "beta"), what="beta, from the new ConfigMap")
            response = await h.client.post("/v1/chat/completions", json=chat("beta"))
            assert response.status_code == 200


async def _has(listed: Any, name: str) -> bool:
    return name in await listed()
