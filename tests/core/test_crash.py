"""Crash safety: a run killed with SIGKILL resumes to the same result, a save that is cut short
never replaces the previous checkpoint, and a full disk fails cleanly."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lft
from lft.cli.main import main
from lft.plugin.testing import FAST
from lft.train import checkpoint

# Dropout makes the result depend on the random state, which the checkpoint must carry.
RUN = [
    "--plugin",
    "lora",
    "trainer.max_steps=12",
    "trainer.checkpoint_every=2",
    "trainer.lr=5e-3",
    "trainer.batch_size=4",
    "lora.dropout=0.2",
]


def argv(model, data, output, *extra):
    return [
        "run",
        "-q",
        "--model",
        str(model),
        "--data",
        str(data["train"]),
        "--eval-data",
        str(data["eval"]),
        "--output",
        str(output),
        *FAST,
        *extra,
    ]


def records(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]


def last_step(output):
    try:
        return max((r.get("step", 0) for r in records(output)), default=0)
    except (OSError, json.JSONDecodeError):
        return 0  # the file is being written


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, lft_tiny_model, lft_sft_data):
    killed = tmp_path / "killed"
    args = argv(lft_tiny_model, lft_sft_data, killed, *RUN)
    proc = subprocess.Popen([sys.executable, "-m", "lft.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while last_step(killed) < 6:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()}"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists() and not (killed / "summary.json").exists()
    saved_step = checkpoint.load(killed / "checkpoints" / "last.ckpt")["global_step"]
    assert 4 <= saved_step < 12 and saved_step % 2 == 0

    assert main(args + ["--resume"]) == 0
    straight = tmp_path / "straight"
    assert main(argv(lft_tiny_model, lft_sft_data, straight, *RUN)) == 0

    resumed_records = [r for r in records(killed) if "loss" in r]
    straight_records = [r for r in records(straight) if "loss" in r]
    assert [r["step"] for r in resumed_records] == list(range(1, 13))  # each step once, none missing
    assert [r["loss"] for r in resumed_records] == pytest.approx([r["loss"] for r in straight_records], rel=1e-5)
    after = json.loads((killed / "summary.json").read_text())["after"]
    assert after["eval_loss"] == pytest.approx(
        json.loads((straight / "summary.json").read_text())["after"]["eval_loss"], rel=1e-5
    )
    from safetensors.torch import load_file

    got = load_file(killed / "final" / "adapter_model.safetensors")
    expected = load_file(straight / "final" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    for key in got:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert not list((killed / "checkpoints").glob(".*"))  # no temporary files left behind


def test_random_state_is_checkpointed_and_restored():
    from lft.train.checkpoint import RngState

    callback = RngState()
    state = checkpoint._decode(
        json.loads(json.dumps(checkpoint._encode(callback.state_dict(), tensors := {}, {}, "x"))), tensors
    )
    expected = torch.rand(5)
    torch.rand(100)  # move the generator on
    callback.load_state_dict(state)
    assert torch.equal(torch.rand(5), expected)


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import safetensors.torch
    from lft.train import checkpoint

    path = sys.argv[1]
    checkpoint.save({"global_step": 1, "weights": torch.ones(4096)}, path)
    real = safetensors.torch.save_file

    def write_half_then_die(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = write_half_then_die
    checkpoint.save({"global_step": 2, "weights": torch.zeros(4096)}, path)
""")


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(path)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    kept = checkpoint.load(path)
    assert kept["global_step"] == 1 and torch.equal(kept["weights"], torch.ones(4096))
    (half,) = tmp_path.glob(".last.ckpt.tmp-*")  # the cut-short write is under another name
    with pytest.raises(checkpoint.CheckpointError, match="damaged or incomplete"):
        checkpoint.load(half)


def test_a_damaged_checkpoint_is_never_taken_for_good(tmp_path, capsys, lft_tiny_model, lft_sft_data):
    out = tmp_path / "out"
    args = argv(lft_tiny_model, lft_sft_data, out, "trainer.max_steps=2", "trainer.checkpoint_every=1")
    assert main(args) == 0
    ckpt = out / "checkpoints" / "last.ckpt"
    os.truncate(ckpt, ckpt.stat().st_size // 3)
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} is damaged or incomplete" in err and err.count("\n") == 1


def test_a_pickle_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"state_dict": {}, "x": Payload()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="refuses to unpickle"):
        checkpoint.load(path)
    assert not (tmp_path / "pwned").exists()
    torch.save({"global_step": 3, "w": torch.ones(2)}, path)  # tensors and plain values only: fine
    assert checkpoint.load(path)["global_step"] == 3


def test_a_checkpoint_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    # A safetensors file begins with its header's length; 0x80 is also the first byte of a pickle.
    path = tmp_path / "c.ckpt"
    for pad in range(300):
        checkpoint.save({"global_step": 7, "pad": "x" * pad, "w": torch.ones(2)}, path)
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert checkpoint.load(path)["global_step"] == 7


def test_checkpoint_round_trip_keeps_types(tmp_path):
    value = {
        "a": (0.9, 0.999),
        "state": {0: {"exp_avg": torch.arange(6.0).reshape(2, 3)}, 1: {"step": torch.tensor(3)}},
        "inf": float("inf"),
        "none": None,
        "flag": True,
        "text": "x",
        "__lft_tensor__": "escaped",
        "nested": [[1, 2]],
    }
    shared = torch.ones(4)
    value["tied"] = [shared, shared[:2]]  # tensors sharing memory, which safetensors refuses as is
    checkpoint.save(value, tmp_path / "c.ckpt")
    got = checkpoint.load(tmp_path / "c.ckpt")
    assert got["a"] == (0.9, 0.999) and set(got["state"]) == {0, 1}
    assert torch.equal(got["state"][0]["exp_avg"], value["state"][0]["exp_avg"])
    assert got["inf"] == float("inf") and got["none"] is None and got["flag"] is True
    assert got["__lft_tensor__"] == "escaped" and got["nested"] == [[1, 2]]
    assert torch.equal(got["tied"][1], torch.ones(2))
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot store checkpoint.bad .*its type, object,"):
        checkpoint.save({"bad": object()}, tmp_path / "d.ckpt")


def enospc_when(monkeypatch, predicate):
    """Make lft's checkpoint writes whose file name matches ``predicate`` fail half-way with ENOSPC."""
    import peft  # noqa: F401  (imported first, so it keeps the real safetensors writer)
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, metadata=None):
        if predicate(str(filename), calls):
            with open(filename, "wb") as handle:
                handle.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(
    tmp_path, capsys, monkeypatch, lft_tiny_model, lft_sft_data
):
    out = tmp_path / "out"
    args = argv(lft_tiny_model, lft_sft_data, out, "trainer.max_steps=6", "trainer.checkpoint_every=2")

    def second_checkpoint(name, calls):
        if ".last.ckpt.tmp" in name:
            calls["n"] += 1
        return calls["n"] == 2

    enospc_when(monkeypatch, second_checkpoint)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert (
        f"could not write the checkpoint {out / 'checkpoints' / 'last.ckpt'}: No space left on device; "
        "the previous one is kept" in err
    )
    assert checkpoint.load(out / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert not list((out / "checkpoints").glob(".*")) and not (out / "final").exists()
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0  # space is back: the run continues from step 2
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_saving_the_final_model(tmp_path, capsys, monkeypatch, lft_tiny_model, lft_sft_data):
    out = tmp_path / "out"
    args = argv(lft_tiny_model, lft_sft_data, out, "trainer.max_steps=3")
    import peft

    def full_disk(self, path, **kwargs):
        (Path(path) / "adapter_model.safetensors").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", full_disk)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not save the final model" in err and "No space left on device" in err
    assert not (out / "final").exists() and not list(out.glob(".final*"))
    assert checkpoint.load(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0
    assert (out / "final" / "adapter_model.safetensors").is_file()


class Terminate:
    """Sends this process SIGTERM, as a job scheduler would, after a given optimizer step."""

    name = "terminate"

    def __init__(self, at):
        self.at = at

    @lft.hookimpl
    def lft_callbacks(self, config):
        import lightning as L

        at = self.at

        class Send(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == at:
                    os.kill(os.getpid(), signal.SIGTERM)

        return [Send()]


def test_sigterm_saves_a_checkpoint_and_stops_with_an_error(tmp_path, lft_tiny_model, lft_sft_data):
    out = tmp_path / "out"
    config = {
        "model.path": str(lft_tiny_model),
        "data.train": str(lft_sft_data["train"]),
        "output": str(out),
        "trainer.max_steps": 40,
        "trainer.precision": "32-true",
        "eval.task": "none",
        "trainer.checkpoint_every": 100,
    }
    before = signal.getsignal(signal.SIGTERM)
    # Lightning's own SIGTERM handler would end the run at the next batch, exit status 0, no checkpoint
    with pytest.raises(
        lft.LftError, match=r"^interrupted at step 3; a checkpoint was saved in .*; continue with --resume$"
    ):
        lft.run(config, plugins=[Terminate(3)], quiet=True)
    assert checkpoint.load(out / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) == before  # handlers are given back


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    from lft.train.callbacks import RunMonitor

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)] + [
        json.dumps({"step": 3, "eval_loss": 2.0})
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the kill cut the last line
    RunMonitor(tmp_path)._forget_after(3)
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 0.5},
        {"step": 3, "loss": 1 / 3},
        {"step": 3, "eval_loss": 2.0},
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
