"""The Python client keeps a StreamLoss within the server's max_stream_chunks (advertised in
ListAlgorithms' limits): by default with room to spare, and with a small stream_chunk_bytes by
sending fewer, larger chunks."""

from __future__ import annotations

from typing import Any

import numpy as np
from softgate.settings import Settings
from softgate_client import SoftgateClient, _wire
from softgate_client.client import _CHUNK_HEAD_BYTES, DEFAULT_CHUNK_BYTES


def test_a_batch_within_max_tokens_fits_max_stream_chunks_at_the_clients_chunk_size() -> None:
    """The defaults' arithmetic: max_tokens tokens and max_sequences sequences of the widest
    batch (every tensor 8 bytes an element) in chunks of DEFAULT_CHUNK_BYTES. Two consecutive
    chunks hold more than one chunk's room (each is as long as it can be), so there are at most
    2 * bytes / room + 1 of them: 389, against 16384."""
    s = Settings()
    widest = 8 * len(_wire.BATCH_FIELDS)  # (a per-token or a per-sequence tensor each)
    data = (s.max_tokens + s.max_sequences) * widest
    most = 2 * data // (DEFAULT_CHUNK_BYTES - _CHUNK_HEAD_BYTES) + 1
    assert most <= s.max_stream_chunks, most


def test_the_client_sends_no_more_chunks_than_the_server_takes(inprocess_server: Any) -> None:
    """A client whose stream_chunk_bytes would cut a batch into more chunks than the server's
    max_stream_chunks sends it in fewer, larger ones (they were refused INVALID_ARGUMENT
    too_large), with the unary call's results."""
    srv = inprocess_server(max_stream_chunks=4)
    rng = np.random.default_rng(0)
    b, t = 600, 32  # 150 KiB of logp and old_logp: the client asks the server's limits
    logp = (-rng.random(b * t) - 0.1).astype(np.float32)
    batch = {"lengths": np.full(b, t), "advantages": rng.standard_normal(b).astype(np.float32)}
    with SoftgateClient(srv.target, stream_chunk_bytes=16 << 10) as c:
        streamed = c.loss(logp, logp + np.float32(0.01), stream=True, **batch)
        assert c.stream_chunk_bytes == 16 << 10  # (left as asked: ~20 chunks a batch)
        unary = c.loss(logp, logp + np.float32(0.01), stream=False, **batch)
    assert streamed.streamed and 1 <= streamed.chunks <= 4, streamed.chunks
    assert streamed.loss == unary.loss
    assert np.array_equal(streamed.grad, unary.grad)
