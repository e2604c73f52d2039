"""deploy/: the Kubernetes manifests validate against the API's schemas (the PyPI package
kubernetes-validate, offline), their numbers fit together (the drain inside the grace
period, every WHISPERSTREAM_* variable a valid setting), and so do compose.yaml's; the
Dockerfile builds where Docker is usable (skipped with the reason where it is not)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from harness import ROOT

from server.config import Settings, load_settings
from server.metrics import Metrics

DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes still maintained when this was written, and the newest known.
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.utils.latest_version())
FINISH_MARGIN_S = 5  # what terminationGracePeriodSeconds keeps beyond the drain


def _manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        if path.name.endswith("-values.yaml"):  # a Helm chart's values, not a manifest
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _manifests() if d["kind"] == kind]


def _settings_from(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Settings:
    """The settings a replica with this environment starts with (no config file)."""
    monkeypatch.chdir(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings()


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_kubernetes_manifests_validate(version: str) -> None:
    docs = _manifests()
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)
    assert sorted(d["kind"] for d in docs) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
        "Service",
    ]


def test_the_deployment_probes_readiness_and_liveness_and_drains_within_its_grace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (deployment,) = _of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert (
        container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    )
    env = {e["name"]: e.get("value", '["a-key-from-the-secret"]') for e in container["env"]}
    settings = _settings_from(env, monkeypatch, tmp_path)
    assert settings.model.workers == int(container["resources"]["requests"]["cpu"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain_s = (
        float(pre_stop[1]) + settings.limits.drain_grace_s + settings.limits.shutdown_timeout_s
    )
    assert pod["terminationGracePeriodSeconds"] >= drain_s + FINISH_MARGIN_S, drain_s
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_autoscaler_scales_on_a_metric_the_server_serves_below_its_maximum(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (hpa,) = _of_kind("HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert f"# TYPE {name} gauge" in Metrics().render().decode()
    (deployment,) = _of_kind("Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value", '["k"]') for e in container["env"]}
    max_sessions = _settings_from(env, monkeypatch, tmp_path).limits.max_sessions
    assert 0 < float(metric["pods"]["target"]["averageValue"]) < max_sessions
    values = yaml.safe_load((KUBERNETES / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert name in rule["seriesQuery"] and rule["name"]["as"] == name
    (pdb,) = _of_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_compose_runs_valid_settings_behind_haproxy_and_lets_the_drain_finish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"whisperstream", "haproxy", "mosquitto"}
    replica = services["whisperstream"]
    settings = _settings_from(replica["environment"], monkeypatch, tmp_path)
    assert settings.mqtt.enabled and settings.mqtt.host == "mosquitto"
    stop_s = float(re.fullmatch(r"(\d+)s", replica["stop_grace_period"]).group(1))  # type: ignore[union-attr]
    assert stop_s >= settings.limits.drain_grace_s + settings.limits.shutdown_timeout_s + 5
    subnet = compose["networks"]["backend"]["ipam"]["config"][0]["subnet"]
    assert [str(n) for n in settings.server.trusted_proxies] == [subnet]
    (config,) = services["haproxy"]["volumes"]
    assert (DEPLOY / config.split(":")[0]).resolve() == DEPLOY / "haproxy.cfg"
    assert "whisperstream:8765" in (DEPLOY / "haproxy.cfg").read_text()


def test_the_haproxy_config_is_valid() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is missing: apt-get install -y haproxy")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(DEPLOY / "haproxy.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def _image_env(text: str) -> dict[str, str]:
    """The WHISPERSTREAM_* variables a Dockerfile's ENV lines set."""
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    instructions = code.replace("\\\n", " ").splitlines()
    env = " ".join(line[4:] for line in instructions if line.startswith("ENV "))
    return dict(re.findall(r"(WHISPERSTREAM_\w+)=(\S+)", env))


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_dockerfile_runs_as_a_user_with_a_health_check_and_the_bundled_model(
    dockerfile: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = (DEPLOY / dockerfile).read_text()
    assert re.search(r"^USER 10001", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/healthz", text, re.M)
    assert re.search(r'pip install "?/src', text)  # the package; a dependency bundles the model
    assert 'ENTRYPOINT ["whisperstream"]' in text
    settings = _settings_from(_image_env(text), monkeypatch, tmp_path)  # every one valid
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8765


def test_the_cuda_image_serves_on_the_gpu_with_both_engines(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = (DEPLOY / "Dockerfile.cuda").read_text()
    assert re.search(r"^FROM nvidia/cuda:12\.\S*cudnn", text, re.M)  # CTranslate2: CUDA 12, cuDNN
    assert 'pip install "/src[torch]"' in text
    settings = _settings_from(_image_env(text), monkeypatch, tmp_path)
    assert settings.model.device == "cuda"
    assert settings.model.compute_type == "int8_float16"


def _docker_unusable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not installed"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no reason given"])[-1]
        return f"`docker info` fails: {why}"
    return None


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_dockerfile_builds_an_image_that_runs_as_a_user(dockerfile: str) -> None:
    unusable = _docker_unusable()
    if unusable is not None:
        pytest.skip(unusable)
    tag = f"whisperstream:test-deploy-{dockerfile.lower().replace('.', '-')}"
    build = subprocess.run(
        ["docker", "build", "-f", str(DEPLOY / dockerfile), "-t", tag, str(ROOT)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    user = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert user.stdout.strip() == "10001", user
    model = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--entrypoint",
            "python",
            tag,
            "-c",
            "from server.engines.models import resolve_model_path as r; print(r('bundled'))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert model.returncode == 0 and model.stdout.strip(), model
