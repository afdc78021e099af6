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
