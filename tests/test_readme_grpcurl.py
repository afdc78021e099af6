"""The README's grpcurl example for a trainer in another language: its JSON request, read with
protobuf's JSON mapping (grpcurl's), sent to a real server, gets the answer the README shows."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc
from test_client_harness import ServerThread

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _find(pattern: str) -> re.Match[str]:
    m = re.search(pattern, README, re.S)
    assert m is not None, f"the README's grpcurl example lost {pattern!r}"
    return m


def test_the_readme_grpcurl_request_gets_the_readme_answer() -> None:
    block = _find(r"grpcurl -plaintext -d @ \S+ (\S+) <<'EOF'\n(.*?)\nEOF\n")
    assert block.group(1) == "softgate.v1.LossService/ComputeLoss"
    request = json_format.Parse(block.group(2), pb.ComputeLossRequest())
    loss = float(_find(r'`"loss": (-?[0-9.e-]+)`').group(1))
    shown = json.loads(_find(r'`"outputs": (\{"gradient": .*?\}\})`').group(1))["gradient"]
    values = [float(x) for x in _find(r"the float32 gradient `\[([^\]]+)\]`").group(1).split(",")]

    with ServerThread() as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        response = pb_grpc.LossServiceStub(ch).ComputeLoss(request, timeout=60)
    answer = json.loads(json_format.MessageToJson(response))
    assert answer["loss"] == pytest.approx(loss, rel=1e-12)
    assert answer["outputs"]["gradient"] == shown
    grad = np.frombuffer(base64.b64decode(shown["data"]), "<f4")
    np.testing.assert_allclose(grad, values, rtol=1e-7)
    assert set(answer["metrics"]) >= {"gate_mean_pos", "gate_mean_neg", "clip_fraction"}
