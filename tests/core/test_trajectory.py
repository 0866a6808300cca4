"""The reference trajectory: the first 20 per-step losses and gradient norms (before clipping) of
each built-in method, on a pinned tiny model and fixed data in fp32 (4 x 2 accumulated
micro-batches; the online methods on fixed experience), as committed in
tests/reference_trajectory.json.

A change that moves them beyond float noise fails here. When the move is meant, write the new
reference with ``python tests/invariance.py --write-trajectory`` and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import invariance as inv

UPDATE = "python tests/invariance.py --write-trajectory (and say why in the commit)"


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return inv.trajectory(tmp_path_factory.mktemp("trajectory"))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(inv.TRAJECTORY))
def test_the_first_steps_follow_the_reference(measured: dict, name: str) -> None:
    reference = json.loads(Path(inv.TRAJECTORY_FILE).read_text(encoding="utf-8"))
    assert name in reference, f"no reference for {name}; write it with {UPDATE}"
    got, want = measured[name], reference[name]
    assert len(got["loss"]) == len(want["loss"]) == inv.TRAJECTORY_STEPS
    for key in ("loss", "grad_norm"):
        for step, (a, b) in enumerate(zip(got[key], want[key]), 1):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), (
                f"{name}: {key} at step {step} is {a}, the reference says {b}; if the change is meant, {UPDATE}"
            )


def test_the_reference_trains() -> None:
    """The reference itself is a real trajectory: the likelihood objectives' losses fall."""
    reference = json.loads(Path(inv.TRAJECTORY_FILE).read_text(encoding="utf-8"))
    for name in ("sft", "sft_lora", "dpo", "orpo", "simpo", "reward"):
        losses = reference[name]["loss"]
        assert losses[-1] < 0.9 * losses[0], name
