"""The client's message sizes: every streamed chunk (request and response) fits the chunk size,
and the unary-vs-stream decision and the chunks count the response's outputs and the server's
own message limit, asked before the first large call."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from softgate_client import SoftgateClient, pack_batch
from softgate_client.client import _CHUNK_HEAD_BYTES
from softgate_client.errors import InvalidArgumentError, ResourceExhaustedError
from test_client_harness import ServerThread

ALL_OUTPUTS = ("advantages", "ratio", "gate_weight", "clip_mask", "mask")
MiB = 1 << 20


def ragged(lengths: list[int], dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logp, offsets, per-sequence advantages) of a ragged batch."""
    ln = np.asarray(lengths, np.int64)
    off = np.concatenate([[0], np.cumsum(ln)])
    logp = (-np.random.default_rng(0).random(int(off[-1])) - 0.01).astype(dtype)
    adv = np.where(np.arange(len(ln)) % 2 == 0, 1.0, -1.0).astype(dtype)
    return logp, off, adv


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


@pytest.fixture(scope="module")
def small_server():
    """A server whose message limit (1 MiB, both ways) is far under the client's (512 MiB)."""
    with ServerThread(max_message_bytes=MiB) as s:
        yield s


# ---------------------------------------------------------------- chunk_bounds


def test_chunk_bounds_cut_before_the_chunk_is_full() -> None:
    # float64 logp (8 B / token), advantages (8 B) and offsets (8 B) per sequence; a sequence
    # that crosses the first cut (150 tokens, 1200 B) must neither join its neighbours nor
    # pull the following sequences into its chunk
    logp, off, adv = ragged([10, 150, *[5] * 21])
    p = pack_batch(logp, None, offsets=off, advantages=adv)
    chunk = 1000
    bounds = p.chunk_bounds(chunk)
    assert [s for s, _ in bounds] == [0, *[e for _, e in bounds[:-1]]] and bounds[-1][1] == len(off) - 1
    for s0, s1 in bounds:
        wire = len(p.pieces(s0, s1).join())
        assert wire <= chunk or s1 - s0 == 1, (s0, s1, wire)
    assert (1, 2) in bounds  # the oversized sequence travels alone

    def data(s0: int, s1: int) -> int:
        return int(off[s1] - off[s0]) * 8 + (s1 - s0) * 16

    room = chunk - _CHUNK_HEAD_BYTES
    for s0, s1 in bounds[:-1]:  # as long as possible: one more sequence would not fit
        assert data(s0, s1 + 1) > room


def test_chunk_bounds_at_the_cut_point() -> None:
    # sequences of 7 tokens: 7 * 8 + 16 = 72 data bytes each
    logp, off, adv = ragged([7] * 10)
    p = pack_batch(logp, None, offsets=off, advantages=adv)
    exactly_three = _CHUNK_HEAD_BYTES + 3 * 72
    assert p.chunk_bounds(exactly_three) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert p.chunk_bounds(exactly_three - 1) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert p.chunk_bounds(1) == [(i, i + 1) for i in range(10)]  # each one alone
    assert p.chunk_bounds(1 << 30) == [(0, 10)]
    # the response's outputs count when they are the larger side: every output is 4 float64
    # and 2 BOOL per token, so two sequences take 2 * (7 * 34 + 16) = 508 bytes
    two = _CHUNK_HEAD_BYTES + 508
    assert p.chunk_bounds(two) == [(0, 7), (7, 10)]
    assert p.chunk_bounds(two, 34) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert p.chunk_bounds(two - 1, 34) == [(i, i + 1) for i in range(10)]


def test_chunk_bounds_of_empty_sequences() -> None:
    logp, off, adv = ragged([0] * 100)  # 16 bytes each: advantages and offsets
    p = pack_batch(logp, None, offsets=off, advantages=adv)
    assert p.chunk_bounds(_CHUNK_HEAD_BYTES + 10 * 16) == [(i, i + 10) for i in range(0, 100, 10)]


# ---------------------------------------------------------------- against a server


def test_streamed_chunks_fit_a_small_client_limit(server) -> None:
    """Every message of a stream fits the client's own limit (chunks of 1000 B; the limit 1000 B
    and the proto's 4 KiB "for the rest": the last response carries the summary, whose metrics
    map alone is ~1.2 KB): a 100-token sequence crossing a cut point no longer drags the next
    ones into its chunk (the 21 short sequences after it would make it ~2 KB, its response
    ~1 KB more)."""
    logp, off, adv = ragged([10, 100, *[5] * 21])
    chunk = 1000
    with SoftgateClient(
        f"127.0.0.1:{server.port}", max_message_bytes=chunk + 4096, stream_chunk_bytes=chunk, timeout=60
    ) as c:
        res = c.loss(logp, None, offsets=off, advantages=adv, stream=True)  # (~2 KB: under the limit)
        assert c.stream_chunk_bytes == chunk
    p = pack_batch(logp, None, offsets=off, advantages=adv)
    bounds = p.chunk_bounds(chunk)
    assert len(bounds) == res.chunks
    for s0, s1 in bounds:  # within the chunk, headers counted, or one sequence alone (the 100)
        assert s1 - s0 == 1 or _CHUNK_HEAD_BYTES + int(off[s1] - off[s0]) * 8 + (s1 - s0) * 16 <= chunk
    with SoftgateClient(f"127.0.0.1:{server.port}", timeout=60) as c:
        unary = c.loss(logp, None, offsets=off, advantages=adv, stream=False)
    assert res.streamed and res.chunks > 2 and not unary.streamed
    assert res.loss == unary.loss
    np.testing.assert_array_equal(res.grad, unary.grad)


@pytest.mark.parametrize(
    ("tokens", "outputs", "streamed"),
    [
        (500_000, (), True),  # a 2 MB request: over the server's 1 MiB, under 4 MiB
        (100_000, ALL_OUTPUTS, True),  # a 0.4 MB request whose response is 1.8 MB
        (300_000, ALL_OUTPUTS, True),  # a 1.2 MB request, its response 5.4 MB
        (20_000, ALL_OUTPUTS, False),  # 0.36 MB both ways: unary
    ],
)
def test_calls_fit_the_server_limit_both_ways(server, small_server, tokens, outputs, streamed) -> None:
    """float32 logp with per-sequence advantages: 4 B / token in, 4-18 B / token out. The
    client asks the 1 MiB server's limit and streams whatever request or response would be
    over it, in chunks whose responses fit too; the values equal a unary call's."""
    logp, off, adv = ragged([100] * (tokens // 100), np.float32)
    args = {"offsets": off, "advantages": adv, "outputs": outputs}
    with SoftgateClient(f"127.0.0.1:{small_server.port}", timeout=120) as c:
        res = c.loss(logp, None, **args)
        assert c._server_max_message_bytes == MiB
    with SoftgateClient(f"127.0.0.1:{server.port}", timeout=120) as c:
        unary = c.loss(logp, None, **args, stream=False)
    assert res.streamed == streamed
    assert_same(res, unary, outputs)


def test_a_failed_ask_for_the_server_limit_is_asked_again(small_server, monkeypatch) -> None:
    """Found by an audit: a client whose first large call found the server down remembered
    "no limit known" for good, and every later large call to the 1 MiB server went unary and
    was refused instead of streamed."""
    logp, off, adv = ragged([100] * 5000, np.float32)  # a 2 MB request
    with SoftgateClient(f"127.0.0.1:{small_server.port}", timeout=120) as c:
        asks: list[int] = []
        real = c._stub.ListAlgorithms

        class Down(grpc.RpcError):
            def code(self) -> grpc.StatusCode:
                return grpc.StatusCode.UNAVAILABLE

        def down_at_first(request, **kw):
            asks.append(1)
            if len(asks) == 1:
                raise Down()
            return real(request, **kw)

        monkeypatch.setattr(c._stub, "ListAlgorithms", down_at_first)
        # sent unary (no limit known), refused as over the server's limit: asked again, streamed
        res = c.loss(logp, None, offsets=off, advantages=adv)
        assert res.streamed and c._server_max_message_bytes == MiB and len(asks) == 2
        c.loss(logp, None, offsets=off, advantages=adv)
        assert len(asks) == 2  # a real answer is kept


@pytest.mark.parametrize("chunk_bytes", [900_000, None])
def test_streamed_chunks_fit_the_server_limit_with_their_responses(server, small_server, chunk_bytes) -> None:
    """Chunks of at most 900 kB (or the default 16 MiB, lowered to the server's limit) for a 1 MiB
    server: each chunk's response carries 18 B / token of outputs for its 4 B / token of
    request, and must fit the server's limit too."""
    logp, off, adv = ragged([100] * 3000, np.float32)
    args = {"offsets": off, "advantages": adv, "outputs": ALL_OUTPUTS}
    sizes = {} if chunk_bytes is None else {"stream_chunk_bytes": chunk_bytes}
    with SoftgateClient(f"127.0.0.1:{small_server.port}", **sizes, timeout=120) as c:
        res = c.loss(logp, None, **args, stream=True)
    with SoftgateClient(f"127.0.0.1:{server.port}", timeout=120) as c:
        unary = c.loss(logp, None, **args, stream=False)
    assert res.streamed and res.chunks >= 6
    assert_same(res, unary, ALL_OUTPUTS)


def assert_same(res, unary, outputs) -> None:
    assert (res.loss, res.policy_loss, res.kl_loss) == (unary.loss, unary.policy_loss, unary.kl_loss)
    np.testing.assert_equal(res.metrics, unary.metrics)
    for name in ("grad", *outputs):
        np.testing.assert_array_equal(getattr(res, name), getattr(unary, name), err_msg=name)


def test_a_call_exactly_at_the_stream_threshold_stays_unary(inprocess_server: Any) -> None:
    """only a call whose larger message is *over* stream_threshold_bytes streams."""
    srv = inprocess_server()
    logp, off, adv = ragged([16] * 8)
    p = pack_batch(logp, None, offsets=off, advantages=adv)
    nbytes = max(p.nbytes, p.layout.num_tokens * 8)  # the gradient: 8 B a token
    assert nbytes < 64 * 1024  # (no ask for the server's limit)
    for threshold, streamed in ((nbytes, False), (nbytes - 1, True)):
        with SoftgateClient(srv.target, stream_threshold_bytes=threshold) as c:
            r = c.loss(logp, offsets=off, advantages=adv)
        assert r.streamed is streamed, threshold


def test_the_server_limit_caps_the_threshold_at_90_percent(inprocess_server: Any) -> None:
    """once the server's limit is known, calls over 90% of it stream (room for the
    message's headers and config), and chunks are cut under 90% of it."""
    srv = inprocess_server(max_message_bytes=MiB)
    n = int(0.95 * MiB) // 8
    logp = (-np.random.default_rng(1).random(n) - 0.01).astype(np.float64)
    with SoftgateClient(srv.target) as c:
        r = c.loss(logp, lengths=np.array([n // 2, n - n // 2]), advantages=np.array([1.0, -1.0]))
        assert r.streamed and r.chunks == 2
        assert c.stream_threshold_bytes == c.stream_chunk_bytes == int(0.9 * MiB)


def test_streamed_chunks_fit_the_clients_own_message_limit(inprocess_server: Any) -> None:
    """stream_chunk_bytes is cut to 90% of the client's max_message_bytes, so a streamed
    call sends no message over the client's own limit (the server's is far larger here)."""
    srv = inprocess_server()
    with SoftgateClient(srv.target, max_message_bytes=MiB, stream_chunk_bytes=16 * MiB) as c:
        logp, off, adv = ragged([6000] * 64)  # 3 MiB of float64 logp
        r = c.loss(logp, offsets=off, advantages=adv)
        assert r.streamed and r.chunks >= 4
        assert c.stream_chunk_bytes == int(0.9 * MiB)


def test_boolean_outputs_count_one_byte_a_token_when_chunking(inprocess_server: Any) -> None:
    """the response's bytes per token count clip_mask and mask as 1 byte (BOOL), so
    chunks are as long as the chunk size allows, not cut as if they were floats."""
    srv = inprocess_server()
    seqs, length = 100, 10
    logp, off, adv = ragged([length] * seqs)
    outputs = ("advantages", "ratio", "gate_weight", "clip_mask", "mask")  # (and the gradient)
    per_tok = 4 * 8 + 2  # four float64 outputs, two BOOL ones (the request: 8 B a token)
    per_seq = 8 + 8  # advantages and offsets
    chunk = _CHUNK_HEAD_BYTES + 10 * (length * per_tok + per_seq)  # ten sequences a chunk
    with SoftgateClient(srv.target, stream_chunk_bytes=chunk) as c:
        r = c.loss(logp, offsets=off, advantages=adv, outputs=outputs, stream=True)
        u = c.loss(logp, offsets=off, advantages=adv, outputs=outputs, stream=False)
    assert r.chunks == 10
    assert np.array_equal(r.grad, u.grad) and np.array_equal(r.clip_mask, u.clip_mask)


def test_a_server_restarted_with_a_smaller_limit_gets_the_call_streamed() -> None:
    """Found by an audit: the limit asked once was kept for good, so after a restart with a
    smaller one (a config rollout; pods with mixed limits) every large call went unary and was
    refused. A call refused as too large asks the limit again, once, and is planned anew."""
    logp, off, adv = ragged([100] * 5000, np.float32)  # a 2 MB request
    first = ServerThread().start()
    try:
        with SoftgateClient(f"127.0.0.1:{first.port}", timeout=60) as c:
            assert not c.loss(logp, None, offsets=off, advantages=adv).streamed
            assert c._server_max_message_bytes == 512 * MiB
            first.stop()
            with ServerThread(port=first.port, max_message_bytes=MiB):
                res = c.loss(logp, None, offsets=off, advantages=adv)
                assert res.streamed and c._server_max_message_bytes == MiB
                with pytest.raises(ResourceExhaustedError, match="larger than max"):  # as forced
                    c.loss(logp, None, offsets=off, advantages=adv, stream=False)
    finally:
        first.stop()


@pytest.mark.parametrize("own_limit", [False, True])
def test_a_sequence_too_large_for_one_message_is_refused_by_name(server, small_server, own_limit) -> None:
    """Found by an audit: one sequence larger than the limit even alone got gRPC's bare
    `Received message larger than max (1600086 vs. 1048576)`, naming neither the sequence nor
    the limit, though the client knew both."""
    logp, off, adv = ragged([10, 300_000, 10], np.float32)  # sequence 1: 1.2 MB
    target, kw = (server.port, {"max_message_bytes": MiB}) if own_limit else (small_server.port, {})
    with (
        SoftgateClient(f"127.0.0.1:{target}", timeout=60, **kw) as c,
        pytest.raises(InvalidArgumentError) as ei,
    ):
        c.loss(logp, None, offsets=off, advantages=adv)
    (v,) = ei.value.violations
    whose = "this client's" if own_limit else "the server's"
    assert v.field == "batch.offsets[1]" and v.reason == "too_large"
    assert (
        f"sequence 1 has 300000 tokens, 1200012 bytes in one message, over {whose} max_message_bytes 1048576"
        in (v.description)
    )


def test_a_request_just_under_the_smallest_server_limit_asks_it(inprocess_server: Any) -> None:
    """Found by an audit: the limit was asked only for more than 64 KiB of data, so a request
    of 65,520 data bytes went unary to a 64 KiB server and was refused with its headers."""
    srv = inprocess_server(max_message_bytes=64 * 1024)
    logp, off, adv = ragged([8185, 8185], np.float32)
    with SoftgateClient(srv.target, timeout=60) as c:
        r = c.loss(logp, None, offsets=off, advantages=adv)
        assert r.streamed and r.chunks == 2 and c._server_max_message_bytes == 64 * 1024


def test_a_callers_channel_limit_gets_the_call_streamed_under_it(server) -> None:
    """Found by an audit: a caller's channel (`grpc.insecure_channel(t)`, gRPC's 4 MiB receive
    limit) refused a large call's response (`CLIENT: Received message larger than max`) and
    the re-planned call went unary again, refused again. The client now keeps its threshold
    and chunks under 90% of the limit gRPC names (a 256 KiB one here, for speed)."""
    limit = 256 * 1024
    logp, off, adv = ragged([1000] * 100, np.float32)  # 400 KB each way
    with SoftgateClient(f"127.0.0.1:{server.port}", timeout=60) as own:
        unary = own.loss(logp, None, offsets=off, advantages=adv)
    assert not unary.streamed
    ch = grpc.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_receive_message_length", limit)]
    )
    with SoftgateClient(channel=ch, timeout=60) as c:
        for _ in range(2):  # (the second call streams at once)
            res = c.loss(logp, None, offsets=off, advantages=adv)
            assert res.streamed and res.chunks == 2
            assert_same(res, unary, ())
            assert c.stream_threshold_bytes == c.stream_chunk_bytes == int(0.9 * limit)


def test_a_small_call_forced_to_stream_keeps_to_the_servers_chunk_count() -> None:
    """A call under the size at which the client asks the server's limits, streamed by
    `stream=True` in small chunks, sent more chunks than max_stream_chunks and was refused
    (`chunk[8]: too_large`; an audit): a stream of several chunks asks the limits first."""
    from softgate.grpc.in_process import in_process_server

    logp = np.full((64, 64), -1.0, np.float32)
    adv = np.ones(64, np.float32)
    with (
        in_process_server(max_stream_chunks=8) as target,
        SoftgateClient(target, stream_chunk_bytes=1024) as c,
    ):
        streamed = c.loss(logp, None, advantages=adv, stream=True)
        unary = c.loss(logp, None, advantages=adv, stream=False)
    assert streamed.loss == unary.loss
    assert np.array_equal(streamed.grad, unary.grad)
