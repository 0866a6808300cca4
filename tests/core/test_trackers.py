"""Experiment trackers through Lightning's loggers (``trainer.loggers``), each read back with the
tracker's own reader: TensorBoard's EventAccumulator, MLflow's client on a local store, and the
folder of an offline W&B run. Every metrics.jsonl record arrives under the same name and step."""

import json
import time

import pytest

import lft
from lft.cli.main import main
from lft.plugin.testing import FAST


def config(model, data, output, loggers, **extra):
    out = {
        "model.path": str(model),
        "data.train": str(data["train"]),
        "data.eval": str(data["eval"]),
        "output": str(output),
        "plugins": ["sft", "lora"],
        "trainer.max_steps": 4,
        "trainer.eval_every": 2,
        "trainer.lr": 5e-3,
        "trainer.loggers": loggers,
        "guards.enabled": False,
    }
    return {**dict(item.split("=", 1) for item in FAST), **out, **extra}


def records(output):
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def series(output, name):
    """``[(step, value)]`` of one metric in metrics.jsonl."""
    return [(r["step"], r[name]) for r in records(output) if r.get(name) is not None]


def test_tensorboard_gets_every_record_the_config_and_the_summary(tmp_path, lft_tiny_model, lft_sft_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    result = lft.run(config(lft_tiny_model, lft_sft_data, output, ["csv", "tensorboard"]), quiet=True)
    events = EventAccumulator(str(output / "tensorboard" / "lft" / "run"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for name in ("loss", "lr", "tokens_per_s", "grad_norm", "eval_loss"):
        got = [(e.step, e.value) for e in events.Scalars(name)]
        want = series(output, name)
        assert [s for s, _ in got] == [s for s, _ in want] and want, name
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), name
    assert [s for s, _ in series(output, "eval_loss")] == [2, 4]
    assert "summary/after/eval_loss" in scalars and "summary/steps" in scalars
    after = events.Scalars("summary/after/eval_loss")[-1].value
    assert after == pytest.approx(result.metrics["after"]["eval_loss"], rel=1e-6)
    # The CSV logger has the same names (metrics.csv), and the config as hparams.yaml.
    csv = (output / "logs" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"loss", "lr", "step", "eval_loss"} <= set(csv[0].split(","))
    assert "trainer.lr: 0.005" in (output / "logs" / "version_0" / "hparams.yaml").read_text()


def test_mlflow_local_store_run_continues_on_resume(tmp_path, lft_tiny_model, lft_sft_data):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"name": "mlflow", "tracking_uri": store, "project": "arith", "run_name": "first", "tags": {"team": "eval"}}
    output = tmp_path / "run"
    lft.run(config(lft_tiny_model, lft_sft_data, output, [spec], **{"trainer.checkpoint_every": 2}), quiet=True)
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("arith")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "first" and run.data.tags["team"] == "eval"
    assert run.data.params["trainer.lr"] == "0.005" and run.data.params["plugins"] == '["sft", "lora"]'
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(s, pytest.approx(v, rel=1e-6)) for s, v in series(output, "loss")]
    assert "summary/after/eval_loss" in run.data.metrics

    lft.run(config(lft_tiny_model, lft_sft_data, output, [spec], resume=True, **{"trainer.max_steps": 6}), quiet=True)
    (again,) = client.search_runs([experiment.experiment_id])  # the same run, continued
    assert again.info.run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert steps == [1, 2, 3, 4, 5, 6]


def wandb_history(path):
    """The history rows of an offline W&B run file, read with W&B's own record schema. The file is
    W&B's append-only log: a 7-byte header, then 32 KiB blocks of chunks (checksum, length, type:
    1 whole, 2 first, 3 middle, 4 last), each record one serialized ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw, pos, pending, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_run_file_holds_every_record(tmp_path, monkeypatch, lft_tiny_model, lft_sft_data):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    output = tmp_path / "run"
    spec = {"name": "wandb", "project": "arith", "tags": {"stage": "sft"}}
    result = lft.run(config(lft_tiny_model, lft_sft_data, output, [spec]), quiet=True)
    (folder,) = (output / "wandb").glob("offline-run-*")
    (run_file,) = folder.glob("run-*.wandb")
    assert json.loads((output / "trackers.json").read_text())["wandb_id"] in run_file.name
    deadline = time.monotonic() + 30  # W&B's own process writes the file; finish() waits for it, this is a margin
    while (
        "summary/after/eval_loss" not in {k for r in wandb_history(run_file) for k in r} and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    rows = wandb_history(run_file)
    losses = [(r["trainer/global_step"], r["loss"]) for r in rows if "loss" in r]
    assert losses == [(s, pytest.approx(v, rel=1e-6)) for s, v in series(output, "loss")]
    evals = [(r["trainer/global_step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    assert evals == [(s, pytest.approx(v, rel=1e-6)) for s, v in series(output, "eval_loss")]
    (last,) = [r for r in rows if "summary/after/eval_loss" in r]
    assert last["summary/after/eval_loss"] == pytest.approx(result.metrics["after"]["eval_loss"])


def test_a_tracker_without_its_package_names_the_extra(tmp_path, capsys, monkeypatch, lft_tiny_model, lft_sft_data):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    earlier = tmp_path / "o" / "summary.json"  # an earlier run's output, which --overwrite would replace
    earlier.parent.mkdir()
    earlier.write_text("{}")
    argv = ["run", "-q", "--model", str(lft_tiny_model), "--data", str(lft_sft_data["train"]), "--overwrite",
            "--output", str(tmp_path / "o"), "trainer.max_steps=1", "trainer.loggers=[csv,wandb]", *FAST]  # fmt: skip
    assert main(argv) == 2
    assert earlier.read_text() == "{}"  # the error came before anything in the output folder changed
    err = capsys.readouterr().err
    assert 'trainer.loggers: wandb needs the wandb package: pip install -e ".[wandb]"' in err
    assert len(err.strip().splitlines()) == 1


def test_a_tracker_listed_twice_is_a_config_error(tmp_path, lft_tiny_model, lft_sft_data):
    with pytest.raises(lft.ConfigError, match="trainer.loggers: csv is listed more than once"):
        lft.run(config(lft_tiny_model, lft_sft_data, tmp_path / "o", ["csv", {"name": "csv"}]), quiet=True)
