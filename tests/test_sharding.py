"""Sharding one batch across replicas is exact (deploy/README.md, "Scale on paper").

A batch split on sequence boundaries, every group whole in one shard, each shard sent to its
own server with the whole batch's normalisers (num_tokens / num_seqs): the shards' losses add
up to the one-server loss and their gradients are the one-server gradient on their tokens.
The servers are real gRPC servers on loopback (tests/test_client_harness.py); the calls go
through the Python client, concurrently, as a trainer would make them.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from softgate_client import SoftgateClient
from test_client_harness import ServerThread


class CountCalls(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the LossService calls a server received."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        if details.method.endswith("/ComputeLoss"):
            self.calls += 1
        return await continuation(details)


@pytest.fixture(scope="module")
def servers() -> Iterator[list[tuple[ServerThread, CountCalls]]]:
    counters = [CountCalls(), CountCalls()]
    threads = [ServerThread(interceptors=[c]).start() for c in counters]
    try:
        yield list(zip(threads, counters, strict=True))
    finally:
        for t in threads:
            t.stop()


def batch(seed: int = 0, b: int = 32, t: int = 48) -> dict[str, np.ndarray]:
    """A padded batch: 8 groups of 4 scattered over the rows, ragged lengths (>= 2, so no
    sequence is empty and N_seq = B), an interior masked token, garbage in masked slots."""
    rng = np.random.default_rng(seed)
    logp = (-rng.random((b, t)) * 3 - 0.05).astype(np.float32)
    old = np.minimum(logp + rng.standard_normal((b, t)) * 0.2, -1e-3).astype(np.float32)
    ref = np.minimum(logp + rng.standard_normal((b, t)) * 0.1, -1e-3).astype(np.float32)
    lengths = rng.integers(2, t + 1, b)
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask[1, 0] = False
    logp[~mask] = 5.0
    rewards = rng.random(b).astype(np.float32)
    group_ids = np.repeat(np.arange(b // 4), 4)[rng.permutation(b)]
    return {
        "logp": logp,
        "old_logp": old,
        "ref_logp": ref,
        "mask": mask,
        "rewards": rewards,
        "group_ids": group_ids,
    }


def shards_by_group(group_ids: np.ndarray, n: int) -> list[np.ndarray]:
    """Row indices of n shards; every group lies whole in one shard (round robin over groups)."""
    groups = np.unique(group_ids)
    return [np.flatnonzero(np.isin(group_ids, groups[k::n])) for k in range(n)]


CONFIGS: dict[str, dict[str, Any]] = {
    "sapo/seq_mean_token_mean": {"objective": "sapo"},
    "grpo/token_mean/kl": {"objective": "grpo", "aggregation": "token_mean", "kl_beta": 0.05},
    "gspo/seq_mean_token_sum": {"objective": "gspo", "aggregation": "seq_mean_token_sum"},
    "cispo/rloo": {"objective": "cispo", "estimator": "rloo", "aggregation": "token_mean"},
}


@pytest.mark.parametrize("name", CONFIGS)
def test_two_servers_give_the_one_server_loss_and_gradient(
    servers: list[tuple[ServerThread, CountCalls]], name: str
) -> None:
    options = CONFIGS[name]
    b = batch(seed=len(name))
    clients = [SoftgateClient(f"127.0.0.1:{s.port}", timeout=60) for s, _ in servers]
    try:
        whole = clients[0].loss(**b, **options)
        # the whole batch's own normalisers, given to every shard
        glob = {"num_tokens": float(b["mask"].sum()), "num_seqs": float(len(b["logp"]))}
        rows = shards_by_group(b["group_ids"], len(clients))
        before = [c.calls for _, c in servers]
        with ThreadPoolExecutor(len(clients)) as pool:
            parts = list(
                pool.map(
                    lambda cr: cr[0].loss(**{k: v[cr[1]] for k, v in b.items()}, **options, **glob),
                    zip(clients, rows, strict=True),
                )
            )
        assert [c.calls - n for (_, c), n in zip(servers, before, strict=True)] == [1, 1]
    finally:
        for c in clients:
            c.close()

    assert sum(p.loss for p in parts) == pytest.approx(whole.loss, rel=1e-6, abs=1e-9)
    assert sum(p.policy_loss for p in parts) == pytest.approx(whole.policy_loss, rel=1e-6, abs=1e-9)
    assert sum(p.kl_loss for p in parts) == pytest.approx(whole.kl_loss, rel=1e-6, abs=1e-9)
    grad = np.zeros_like(whole.grad)
    for r, p in zip(rows, parts, strict=True):
        grad[r] = p.grad
    scale = float(np.abs(whole.grad).max())
    assert scale > 0
    np.testing.assert_allclose(grad, whole.grad, rtol=1e-6, atol=1e-7 * scale)  # bit-equal on CPU today
    assert not grad[~b["mask"]].any()


def test_own_normalisers_are_not_exact(servers: list[tuple[ServerThread, CountCalls]]) -> None:
    """The counter-check: shards that normalise by their own counts do not add up (unless the
    shards happen to be equal in size), which is why the global counts must travel."""
    b = batch(seed=7)
    rows = shards_by_group(b["group_ids"], 2)
    with SoftgateClient(f"127.0.0.1:{servers[0][0].port}", timeout=60) as c:
        whole = c.loss(**b, aggregation="token_mean")
        parts = [c.loss(**{k: v[r] for k, v in b.items()}, aggregation="token_mean") for r in rows]
    assert b["mask"][rows[0]].sum() != b["mask"][rows[1]].sum()
    assert sum(p.loss for p in parts) != pytest.approx(whole.loss, rel=1e-3)
