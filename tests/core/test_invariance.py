"""The same update for any batch shape. For every built-in objective (the online ones on fixed
experience) and a third-party one, under full fine-tuning and LoRA, in fp32, on rows whose
lengths run from 2 to 80 words, these train the same model within float tolerance:

* one batch of 8;
* 4 accumulated micro-batches of 2 (for online methods: a batch of 8 whose update is computed
  in 4 micro-batches);
* 2 DDP processes of 4 each, on CPU over gloo;
* eager attention instead of sdpa.

The gradients of the first step are compared directly (Adam's first step is nearly a sign and
would hide a wrong scale), then the per-step losses and the weights after two steps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import invariance as inv

WRAPPERS = ("full", "lora")
CASES = list(inv.CASES)
STEPS = 2


def relative(a: dict, b: dict) -> float:
    """``|a - b| / |a|`` over all the tensors of two state dicts with the same names."""
    assert a.keys() == b.keys()
    diff = sum(float((a[n].double() - b[n].double()).square().sum()) for n in a)
    norm = sum(float(a[n].double().square().sum()) for n in a)
    return (diff / max(norm, 1e-30)) ** 0.5


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("invariance")
    inv.write_pinned_model(root / "model")
    inv.write_data(root / "data")
    return root


@pytest.fixture(scope="module")
def records(workdir: Path) -> dict:
    """Every case in every shape: one-process shapes here, the DDP ones in one 2-process launch."""
    out: dict = {}
    data = inv.write_data(workdir / "data")
    for case in CASES:
        for wrapper in WRAPPERS:
            for shape in ("one", "accum", "eager"):
                out[case, shape, wrapper] = inv.train(
                    case, shape, wrapper, workdir / "model", data, workdir / f"{case}-{shape}-{wrapper}", steps=STEPS
                )
    ddp = [[case, "ddp", wrapper] for case in CASES for wrapper in WRAPPERS]
    script = Path(inv.__file__)
    proc = subprocess.run(
        [sys.executable, str(script), json.dumps(ddp), str(workdir), str(STEPS)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for case, shape, wrapper in ddp:
        out[case, shape, wrapper] = torch.load(workdir / f"{case}-{shape}-{wrapper}.record")
    return out


def check_same_update(one: dict, other: dict) -> None:
    assert relative(one["grads"], other["grads"]) < 1e-5
    assert other["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert relative(one["weights"], other["weights"]) < 1e-5
    moved = relative(one["init"], one["weights"])
    assert moved > 1e-4  # the steps did change the weights


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", ["accum", "ddp", "eager"])
def test_every_batch_shape_trains_the_same_model(records: dict, case: str, wrapper: str, shape: str) -> None:
    one = records[case, "one", wrapper]
    assert len(one["losses"]) == STEPS and len(one["grad_norms"]) == STEPS
    check_same_update(one, records[case, shape, wrapper])


@pytest.mark.slow
def test_per_micro_batch_means_would_fail_the_invariant(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows are shaped so that the old rule (each micro-batch's own mean, averaged by the
    accumulation) gives another update: the invariant above can fail."""
    import lft.objective

    data = inv.write_data(workdir / "data")
    one = inv.train("sft", "one", "full", workdir / "model", data, workdir / "naive-one", steps=1)

    def per_micro_batch_mean(loss, counts, totals):  # what lft did before step-level counts
        return next(iter(loss.values())) / 4 if isinstance(loss, dict) else loss / 4

    monkeypatch.setattr(lft.objective, "step_share", per_micro_batch_mean)
    naive = inv.train("sft", "accum", "full", workdir / "model", data, workdir / "naive-accum", steps=1)
    assert relative(one["grads"], naive["grads"]) > 0.05
    assert relative(one["weights"], naive["weights"]) > 1e-4


def test_step_share_is_the_token_mean_of_the_whole_step() -> None:
    """Two micro-batches of 4 and 12 tokens with mean NLLs 2.0 and 1.0: the step's loss is
    (2.0 * 4 + 1.0 * 12) / 16 = 1.25, not the mean of means 1.5."""
    from lft.objective import step_share

    totals = {"tokens": torch.tensor(16.0)}
    first = step_share(torch.tensor(2.0), {"tokens": torch.tensor(4.0)}, totals)
    second = step_share(torch.tensor(1.0), {"tokens": torch.tensor(12.0)}, totals)
    assert float(first + second) == pytest.approx(1.25)
    # a pair term and a chosen-token term: 0.6 over 2 of 4 pairs, 3.0 over 10 of 40 tokens
    share = step_share(
        {"pairs": torch.tensor(0.6), "chosen_tokens": torch.tensor(3.0)},
        {"pairs": torch.tensor(2.0), "chosen_tokens": torch.tensor(10.0)},
        {"pairs": torch.tensor(4.0), "chosen_tokens": torch.tensor(40.0)},
    )
    assert float(share) == pytest.approx(0.6 * 2 / 4 + 3.0 * 10 / 40)
    with pytest.raises(ValueError, match="returned one loss"):
        step_share(torch.tensor(1.0), {"pairs": 2, "chosen_tokens": 5}, {"pairs": 4, "chosen_tokens": 9})
    with pytest.raises(ValueError, match="does not count"):
        step_share({"rows": torch.tensor(1.0)}, {"tokens": 2}, {"tokens": 4})


@pytest.mark.slow
def test_a_short_last_step_of_each_epoch_is_one_step_too(workdir: Path, tmp_path: Path) -> None:
    """10 rows: each epoch is a step of 8 rows and a step of 2. In 2 x 4 micro-batches the
    second step holds one micro-batch, and its rows still weigh as in a batch of 8 (three
    epochs, so the steps stay aligned with the epochs)."""
    rows = [json.loads(line) for line in (workdir / "data" / "sft.jsonl").read_text().splitlines()]
    rows += [{"prompt": "One more.", "completion": "the answer is fifteen"}, {"prompt": "Last.", "completion": "sums"}]
    data = {"sft": tmp_path / "ten.jsonl"}
    data["sft"].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    one = inv.train("sft", "one", "full", workdir / "model", data, tmp_path / "one", steps=6)
    accum = inv.train("sft", "accum", "full", workdir / "model", data, tmp_path / "accum", steps=6)
    assert accum["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert accum["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert relative(one["weights"], accum["weights"]) < 1e-5
