"""The client at the lowest versions it declares: grpcio, protobuf and numpy as client/pyproject.toml's
floors, in the venv scripts/tools/client_floors.sh builds (run by `make tools` / `make test`), with
this tree's client/ on the path. It calls a real server (padded and ragged, unary and streamed,
a refused batch) and must get what this environment's client gets, bit for bit: a trainer
pinned to numpy 1.x is a common case. Skipped when the venv is missing, except in CI (CI set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_tool
from test_client_harness import ServerThread

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".tools" / "client-floors"
sys.path.insert(0, str(REPO / "scripts"))
import lock  # noqa: E402

pytestmark = pytest.mark.integration

# the calls both clients make: inputs from inputs.npz, results into out.npz, the refusal's
# field violations and the versions in use printed as JSON
CALLS = """
import json, sys
import google.protobuf, grpc, numpy as np
from softgate_client import SoftgateClient
from softgate_client.errors import InvalidArgumentError

def calls(port, inputs, out):
    x = dict(np.load(inputs))
    c = SoftgateClient(f"127.0.0.1:{port}", stream_chunk_bytes=4096)
    padded = c.loss(x["logp"], x["old_logp"], mask=x["mask"], rewards=x["rewards"].tolist(),
                    group_ids=x["gids"].tolist(), outputs=("ratio", "gate_weight"))  # lists too
    ragged = c.loss(x["flat"], x["flat_old"], lengths=x["lengths"], advantages=x["adv"], objective="grpo",
                    stream=True)
    bad = x["logp"].copy()
    bad[1, 0] = np.nan  # row 1's first token, sent
    try:
        c.loss(bad, x["old_logp"], mask=x["mask"], rewards=x["rewards"], group_ids=x["gids"])
        refused = None
    except InvalidArgumentError as e:
        refused = [v.field for v in e.violations]
    c.close()
    np.savez(out, padded_grad=padded.grad, padded_ratio=padded.ratio, padded_gate=padded.gate_weight,
             padded_loss=padded.loss, ragged_grad=ragged.grad, ragged_loss=ragged.loss)
    return {"refused": refused, "chunks": ragged.chunks, "streamed": ragged.streamed,
            "numpy": np.__version__, "grpcio": grpc.__version__, "protobuf": google.protobuf.__version__}

if __name__ == "__main__":
    print(json.dumps(calls(int(sys.argv[1]), sys.argv[2], sys.argv[3])))
"""


def _floors() -> dict[str, str]:
    return dict(p.split("==") for p in (VENV / "pins").read_text().split())


def _release(version: str) -> tuple[int, ...]:
    """A version's (major, minor, micro), so that 1.24 and 1.24.0 compare equal."""
    parts = [int(p) for p in version.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def _inputs(path: Path) -> None:
    rng = np.random.default_rng(7)
    b, t = 8, 24
    lengths = rng.integers(1, t + 1, b)
    mask = np.arange(t) < lengths[:, None]
    logp = rng.normal(-1.0, 0.3, (b, t)).astype(np.float32)
    old = (logp + rng.normal(0.0, 0.2, (b, t))).astype(np.float32)
    n = 600
    np.savez(
        path,
        logp=logp,
        old_logp=old,
        mask=mask,
        rewards=rng.random(b).astype(np.float32),
        gids=np.repeat(np.arange(2), 4),
        flat=rng.normal(-1.0, 0.3, n).astype(np.float32),
        flat_old=rng.normal(-1.0, 0.3, n).astype(np.float32),
        lengths=np.array([100, 200, 50, 250]),
        adv=np.array([1.0, -0.5, 0.25, -1.0], np.float32),
    )


def test_the_client_at_its_dependency_floors_gets_what_this_client_gets(tmp_path: Path) -> None:
    if not (VENV / "pins").is_file():
        missing_tool("no .tools/client-floors: run bash scripts/tools/client_floors.sh")
    assert _floors() == dict(p.split("==") for p in lock.floors(lock.PYPROJECTS[0])), (
        "the venv holds other floors than client/pyproject.toml gives this Python: run make tools"
    )
    script = tmp_path / "calls.py"
    script.write_text(CALLS)
    _inputs(tmp_path / "inputs.npz")
    namespace: dict[str, object] = {}
    exec(compile(CALLS, str(script), "exec"), namespace)
    with ServerThread() as server:
        args = [str(server.port), str(tmp_path / "inputs.npz")]
        env = {**os.environ, "PYTHONPATH": str(REPO / "client")}
        out = subprocess.run(
            [str(VENV / "bin" / "python"), str(script), *args, str(tmp_path / "floors.npz")],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert out.returncode == 0, out.stderr
        at_floors = json.loads(out.stdout)
        here = namespace["calls"](server.port, *args[1:], str(tmp_path / "here.npz"))  # type: ignore[operator]

    for name, floor in _floors().items():
        assert _release(at_floors[name]) == _release(floor), (name, at_floors[name], floor)
    row0 = int(np.load(tmp_path / "inputs.npz")["mask"][0].sum())  # row 1 starts there, flat
    assert at_floors["refused"] == here["refused"] == [f"batch.logp[{row0}]"]
    assert at_floors["streamed"] and at_floors["chunks"] > 1 and at_floors["chunks"] == here["chunks"]
    a, b = np.load(tmp_path / "floors.npz"), np.load(tmp_path / "here.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key


def test_the_client_installs_beside_the_previous_protobuf_major() -> None:
    """Found by an audit: the client's floors were the stub generator's stamps (protobuf 7.35.1,
    grpcio 1.85.1), so a trainer pinned to protobuf 6 could not install it. The client's protobuf
    floor stays below the previous major of the locked (newest tested) protobuf."""
    from packaging.requirements import Requirement

    (floor,) = (p.split("==")[1] for p in lock.floors(lock.PYPROJECTS[0]) if p.startswith("protobuf=="))
    locked = lock.read(lock.LOCK_DIR / f"py{sys.version_info.major}.{sys.version_info.minor}.txt")["protobuf"]
    previous_major = f"{int(locked.split('.')[0]) - 1}.0"
    assert Requirement(f"protobuf>={floor}").specifier.contains(previous_major), (floor, locked)
