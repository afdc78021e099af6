"""Conformance vectors (tests/vectors/*.json): the engine reproduces every stored case from its
JSON inputs, and regenerating the cases gives the stored inputs and outputs (no drift)."""

from __future__ import annotations

import json

import pytest
from softgate.engine import METRIC_NAMES, OBJECTIVES, Engine

try:
    from tests.vectors import generate as gen
except ImportError:  # tests/ is not importable as a package from this rootdir
    import pathlib
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.vectors import generate as gen  # type: ignore[no-redef]

ENGINE = Engine(device="cpu", compile=False)


def load(objective: str) -> dict:
    return json.loads((gen.HERE / f"{objective}.json").read_text())


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_stored_vectors_reproduce(objective):
    doc = load(objective)
    assert doc["schema"] == gen.SCHEMA and doc["objective"] == objective
    modes = set()
    for case in doc["cases"]:
        batch = gen.batch_from_json(case["inputs"])
        cfg = gen.config_from_json(case["config"])
        assert cfg.objective.name == objective
        modes.add(cfg.aggregation.mode)
        got = gen.result_to_json(ENGINE.loss(batch, cfg))
        assert set(case["outputs"]["metrics"]) == set(METRIC_NAMES)
        diffs = gen.close(case["outputs"], got, case["name"])
        assert not diffs, diffs[:5]
    assert modes == set(gen.AGG_MODES)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_regenerated_vectors_equal_stored(objective):
    fresh = gen.build_cases(objective, ENGINE)
    diffs = gen.close(load(objective)["cases"], fresh)
    assert not diffs, (
        f"vectors drifted (rerun `python -m tests.vectors.generate` only if intended): {diffs[:5]}"
    )


def test_vectors_are_small():
    total = sum(p.stat().st_size for p in gen.HERE.glob("*.json"))
    assert total < 1_000_000
