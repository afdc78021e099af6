"""StreamLoss's chunk handling in the servicer: chunk checks, joining, and naming a violation
after the chunk it lies in. Found missing by a mutation-testing audit."""

from __future__ import annotations

import torch
from softgate.engine import Batch
from softgate.engine.errors import FieldViolation
from softgate.grpc.servicer import _check_chunk, _chunk_field, _concatenate


def test_engine_violations_are_named_after_the_chunk_they_lie_in():
    """StreamLoss renames a violation of the concatenated batch to its chunk: the first token
    (or sequence) of chunk 1 is chunk[1]...[0], not one past the end of chunk 0."""
    tok_starts, seq_starts = [0, 5, 9], [0, 2, 4]
    b = Batch(
        logp=-torch.ones(9),
        offsets=torch.tensor([0, 2, 5, 7, 9]),
        advantages=torch.zeros(4),
        advantage_level="sequence",
    )
    got = _chunk_field(FieldViolation("logp", "non_finite: value is NaN", 5), b, tok_starts, seq_starts)
    assert (got.field, got.index) == ("chunk[1].logp", 0)
    got = _chunk_field(FieldViolation("advantages", "non_finite: value is NaN", 2), b, tok_starts, seq_starts)
    assert (got.field, got.index) == ("chunk[1].advantages", 0)
    got = _chunk_field(FieldViolation("advantages", "non_finite: value is NaN", 1), b, tok_starts, seq_starts)
    assert (got.field, got.index) == ("chunk[0].advantages", 1)


def test_a_chunk_whose_offsets_do_not_start_at_0_is_refused():
    """Chunk i > 0's offsets[0] is dropped when the chunks are joined: unchecked, a chunk with
    offsets [1, 3] would silently merge its first token into its first sequence."""
    v: list = []
    _check_chunk(Batch(logp=-torch.ones(3), offsets=torch.tensor([1, 3]), advantages=torch.ones(1)), 1, v)
    assert [(x.field, x.index, x.code) for x in v] == [("chunk[1].offsets", 0, "bad_offsets")]


def test_chunks_of_different_dtypes_are_refused_not_promoted():
    """A float64 chunk after a float32 one must be refused (torch.cat would silently promote
    the whole stream, and its outputs, to float64)."""

    def chunk(dtype):
        return Batch(
            logp=-torch.ones(2, dtype=dtype),
            offsets=torch.tensor([0, 2]),
            advantages=torch.ones(1, dtype=dtype),
            advantage_level="sequence",
        )

    v: list = []
    batch, _, _ = _concatenate([chunk(torch.float32), chunk(torch.float64)], v)
    assert batch is None
    assert {(x.field, x.code) for x in v} == {
        ("chunk[1].logp", "inconsistent"),
        ("chunk[1].advantages", "inconsistent"),
    }


def test_a_chunk_tensor_that_is_not_1d_is_refused_by_name_not_joined():
    """Every tensor of a chunk is 1-D, logp and advantages (and group_ids next to advantages)
    too: a [1, 2] logp beside a [3] one reached torch.cat and came back INTERNAL (an audit)."""
    ones = torch.ones

    def refused(**kw):
        v: list = []
        _check_chunk(Batch(offsets=torch.tensor([0, 2]), **kw), 1, v)
        return [(x.field, x.code) for x in v]

    assert refused(logp=-ones(1, 2), advantages=ones(1)) == [("chunk[1].logp", "bad_shape")]
    assert refused(logp=-ones(2), advantages=ones(1, 1)) == [("chunk[1].advantages", "bad_shape")]
    got = refused(logp=-ones(2), advantages=ones(1), group_ids=torch.zeros(1, 1, dtype=torch.int64))
    assert got == [("chunk[1].group_ids", "bad_shape")]
    assert refused(logp=-ones(2), advantages=ones(1), group_ids=torch.zeros(1, dtype=torch.int64)) == []
