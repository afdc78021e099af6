"""The proto contract: committed stubs are fresh, every element is documented, stubs import
from the client package, and, when buf is installed (scripts/tools/buf.sh), buf lint passes
and no change breaks code generated from the contract's baseline (proto/softgate-v1.binpb)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import missing_tool

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "softgate" / "v1" / "softgate.proto"
BASELINE = ROOT / "proto" / "softgate-v1.binpb"  # `make proto-baseline` writes it


def _gen_proto():
    """scripts/gen_proto.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    return gen


def _descriptor_set():
    from google.protobuf import descriptor_pb2

    gen = _gen_proto()
    if problem := gen.generator_problem():
        missing_tool(problem)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = [f"-I{ROOT / 'proto'}", "--include_source_info", f"--descriptor_set_out={out}"]
        r = subprocess.run(
            [*gen.protoc_command(), *args, "softgate/v1/softgate.proto"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        fds = descriptor_pb2.FileDescriptorSet()
        fds.ParseFromString(out.read_bytes())
    return fds.file[0]


def test_stubs_are_fresh():
    """The committed stubs are what the pinned generator writes from proto/, version stamps
    included (stubs written by grpcio-tools 1.85.1 needed protobuf 7.35.1 and grpcio 1.85.1)."""
    if problem := _gen_proto().generator_problem():
        missing_tool(problem)
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr + r.stdout


def test_a_generator_venv_of_another_release_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stubs' stamps are the client's floors: only the pinned grpcio-tools may write them."""
    gen = _gen_proto()
    monkeypatch.setattr(gen, "GENERATOR_VENV", tmp_path / "protoc")
    (tmp_path / "protoc").mkdir()
    (tmp_path / "protoc" / "version").write_text("1.85.1\n")
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    problem = gen.generator_problem()
    assert problem and f"grpcio-tools {gen.GRPCIO_TOOLS} is not in protoc (grpcio-tools 1.85.1)" in problem
    with pytest.raises(SystemExit, match=r"scripts/tools/protoc\.sh"):
        gen.generate(tmp_path / "out")


def test_stubs_needing_a_newer_runtime_than_the_client_declares_are_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an audit: --check ignored the stubs' version stamps, so stubs written by a newer
    grpcio-tools passed it while `import softgate_client` failed on the declared minimum
    grpcio / protobuf. The stamps may not be above client/pyproject.toml's floors."""
    gen = _gen_proto()
    assert gen.runtime_floor_problems() == []
    v1 = tmp_path / "softgate" / "v1"
    shutil.copytree(gen.OUT_ROOT / "softgate" / "v1", v1)
    grpc_stub = v1 / "softgate_pb2_grpc.py"
    text = grpc_stub.read_text()
    grpc_stub.write_text(gen._GRPC_STAMP.sub("GRPC_GENERATED_VERSION = '99.0.0'", text))
    monkeypatch.setattr(gen, "OUT_ROOT", tmp_path)
    (problem,) = gen.runtime_floor_problems()
    assert "needs grpcio >= 99.0.0" in problem


def test_every_element_has_a_leading_comment():
    """Messages, fields, oneofs, enums, enum values, the service and its RPCs: each one carries a
    leading comment (the proto is the documentation for non-Python users)."""
    fd = _descriptor_set()
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location}
    missing: list[str] = []

    def need(path: tuple[int, ...], what: str) -> None:
        if not comments.get(path):
            missing.append(what)

    # FileDescriptorProto: message_type = 4, enum_type = 5, service = 6
    # DescriptorProto: field = 2, nested_type = 3, enum_type = 4, oneof_decl = 8
    def walk_message(msg, path: tuple[int, ...], prefix: str) -> None:
        name = f"{prefix}{msg.name}"
        if msg.options.map_entry:
            return
        need(path, f"message {name}")
        for i, f in enumerate(msg.field):
            need((*path, 2, i), f"field {name}.{f.name}")
        for i, o in enumerate(msg.oneof_decl):
            if not o.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
                need((*path, 8, i), f"oneof {name}.{o.name}")
        for i, nested in enumerate(msg.nested_type):
            walk_message(nested, (*path, 3, i), name + ".")
        for i, e in enumerate(msg.enum_type):
            walk_enum(e, (*path, 4, i), name + ".")

    def walk_enum(enum, path: tuple[int, ...], prefix: str) -> None:
        need(path, f"enum {prefix}{enum.name}")
        for i, v in enumerate(enum.value):
            need((*path, 2, i), f"enum value {v.name}")

    for i, m in enumerate(fd.message_type):
        walk_message(m, (4, i), "")
    for i, e in enumerate(fd.enum_type):
        walk_enum(e, (5, i), "")
    for i, s in enumerate(fd.service):
        need((6, i), f"service {s.name}")
        for j, m in enumerate(s.method):
            need((6, i, 2, j), f"rpc {s.name}.{m.name}")
    assert not missing, "undocumented proto elements: " + ", ".join(missing)
    # the header documents the run metadata key
    assert "softgate-run" in PROTO.read_text().split("package softgate.v1;")[0]


def test_contract_shape():
    """The names other languages code against."""
    fd = _descriptor_set()
    assert fd.package == "softgate.v1"
    (svc,) = fd.service
    assert svc.name == "LossService"
    methods = {m.name: m for m in svc.method}
    assert set(methods) == {"ComputeAdvantages", "ComputeLoss", "StreamLoss", "ListAlgorithms"}
    assert methods["StreamLoss"].client_streaming and methods["StreamLoss"].server_streaming
    msgs = {m.name: m for m in fd.message_type}
    # tensors are raw bytes, never repeated floats; a repeated double is a configuration's few
    # numbers (one weight per reward component), never per sequence or per token
    config_lists = {"AdvantageConfig.reward_weights"}
    for m in msgs.values():
        for f in m.field:
            if f"{m.name}.{f.name}" in config_lists:
                continue
            assert not (f.label == f.LABEL_REPEATED and f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE)), (
                f"{m.name}.{f.name} is a repeated float"
            )
    tensor = {f.name: f for f in msgs["Tensor"].field}
    assert tensor["data"].type == tensor["data"].TYPE_BYTES
    objective_fields = [f.name for f in msgs["Objective"].field]
    assert objective_fields == [
        "sapo",
        "grpo",
        "gspo",
        "gspo_token",
        "cispo",
        "gppo",
        "gmpo",
        "dppo_tv",
        "dppo_kl",
        "clip_cov",
        "kl_cov",
        "reinforce",
        "sapo_seq",
        "cispo_seq",
        "dro",
    ]
    # proto3 optional parameters: unset means the engine default
    for f in msgs["SapoParams"].field:
        assert f.proto3_optional


def test_stubs_import_from_the_client_package():
    code = (
        "from softgate_client.proto.softgate.v1 import softgate_pb2 as pb, softgate_pb2_grpc as g;"
        "assert pb.ComputeLossRequest.DESCRIPTOR.full_name == 'softgate.v1.ComputeLossRequest';"
        "assert g.LossServiceStub and g.LossServiceServicer and g.add_LossServiceServicer_to_server"
    )
    env_path = str(ROOT / "client")
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def _buf() -> str | None:
    local = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    if local.exists():
        return str(local)
    return shutil.which("buf")


def _run_buf(*args: str) -> subprocess.CompletedProcess[str]:
    buf = _buf()
    if buf is None:
        missing_tool("buf not installed (bash scripts/tools/buf.sh)")
    return subprocess.run([buf, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_buf_lint():
    r = _run_buf("lint", "proto")
    assert r.returncode == 0, r.stdout + r.stderr


def test_contract_is_compatible_with_its_baseline(tmp_path):
    """proto/ breaks no code generated from the baseline (buf's FILE rules: names, numbers,
    types, json names, packages), and the baseline is the contract as it now is, comments
    aside: so every change to proto/ goes through `make proto-baseline`, which refuses a
    breaking one."""
    r = _run_buf("breaking", "proto", "--against", str(BASELINE))
    assert r.returncode == 0, "a breaking change to softgate.v1:\n" + r.stdout + r.stderr
    images = []
    for name, source in (("baseline", str(BASELINE)), ("now", "proto")):
        out = tmp_path / f"{name}.binpb"
        r = _run_buf("build", source, "--exclude-source-info", "-o", str(out))
        assert r.returncode == 0, r.stdout + r.stderr
        images.append(out.read_bytes())
    assert images[0] == images[1], "proto/softgate-v1.binpb is stale: run `make proto-baseline`"


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        (
            "tokens with non-positive advantage, > 0. Default 1.05.\n  optional double tau_neg = 2;",
            "tokens with non-positive advantage, > 0. Default 1.05.\n  optional double tau_negative = 2;",
            'changed name from "tau_neg"',
        ),
        ("repeated int64 shape = 2;", "repeated int32 shape = 2;", 'changed type from "int64" to "int32"'),
        ("bytes data = 3;", "bytes data = 7;", 'Previously present field "3" with name "data"'),
        ("  DTYPE_BOOL = 5;\n", "", 'Previously present enum value "5" on enum "Dtype"'),
        (
            "  rpc ListAlgorithms(ListAlgorithmsRequest) returns (ListAlgorithmsResponse);\n",
            "",
            'Previously present RPC "ListAlgorithms"',
        ),
    ],
    ids=["renamed", "retyped", "renumbered", "enum-value-removed", "rpc-removed"],
)
def test_the_baseline_refuses_breaking_changes(tmp_path, old, new, complaint):
    """The check above can fail: each edit, made to a copy of proto/, is refused by name."""
    copy = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", copy)
    path = copy / PROTO.relative_to(ROOT / "proto")
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))
    r = _run_buf("breaking", str(copy), "--against", str(BASELINE))
    assert r.returncode != 0 and complaint in r.stdout, r.stdout + r.stderr
