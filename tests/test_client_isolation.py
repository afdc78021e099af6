"""The client package stands alone: no torch needed, never the server package."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120
    )


def test_client_imports_and_packs_without_torch() -> None:
    out = _run(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        import softgate_client
        from softgate_client import SoftgateClient, pack_batch
        from softgate_client.errors import InvalidArgumentError
        p = pack_batch(np.full((2, 3), -1.0, np.float32), mask=np.array([[1, 1, 0], [1, 0, 0]]), advantages=[1.0, -1.0])
        assert p.layout.offsets.tolist() == [0, 2, 3]
        c = SoftgateClient("127.0.0.1:1", retries=1, timeout=0.5)
        c.close()
        try:
            import softgate_client.torch
        except ImportError:
            pass
        else:
            raise SystemExit("softgate_client.torch imported without torch")
        print("ok", "softgate" in sys.modules)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "False"]


def test_client_reads_error_details_without_googleapis_protos() -> None:
    """The client depends on grpcio, protobuf and numpy only: it reads a BadRequest from the
    trailing status with its own wire reader, with grpcio-status and google.rpc unimportable."""
    out = _run(
        """
        import sys
        for m in ("grpc_status", "grpc_status.rpc_status", "google.rpc", "google.rpc.status_pb2"):
            sys.modules[m] = None
        import grpc
        from softgate_client.errors import InvalidArgumentError, from_rpc_error

        # google.rpc.Status{code 3, message "bad", details [Any{BadRequest{field_violations [
        #   {field "logp[2]", description "non_finite: nan", reason "NON_FINITE"}]}}]}, by hand
        def ld(num, body):
            return bytes([num << 3 | 2, len(body)]) + body
        fv = ld(1, b"logp[2]") + ld(2, b"non_finite: nan") + ld(3, b"NON_FINITE")
        any_ = ld(1, b"type.googleapis.com/google.rpc.BadRequest") + ld(2, ld(1, fv))
        status = bytes([1 << 3, 3]) + ld(2, b"bad") + ld(3, any_)

        class Err(grpc.RpcError):
            def code(self): return grpc.StatusCode.INVALID_ARGUMENT
            def details(self): return "plain"
            def trailing_metadata(self): return (("grpc-status-details-bin", status),)

        e = from_rpc_error(Err())
        assert isinstance(e, InvalidArgumentError), type(e)
        print(e.details, [str(v) for v in e.violations], e.reasons)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "bad ['logp[2]: non_finite: nan'] ['non_finite']"


def test_client_never_imports_the_server_package() -> None:
    out = _run(
        """
        import sys, importlib, pkgutil
        import softgate_client
        for m in pkgutil.walk_packages(softgate_client.__path__, "softgate_client."):
            importlib.import_module(m.name)
        bad = sorted(n for n in sys.modules if n == "softgate" or n.startswith("softgate."))
        print(bad)
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
