"""Experiment trackers through Lightning's own loggers: CSV (the default), TensorBoard, MLflow and
Weights & Biases, chosen with ``trainer.loggers``.

Every record that goes to ``metrics.jsonl`` reaches every logger under the same names, at the same
step (``publish``): the losses, the learning rate, tokens/s, the held-out evaluations and the
online methods' reward, KL and lengths. The resolved config is logged as hyperparameters once, and
the run's summary as summary metrics (``summary/...``) at the end. Only the first process logs
(``metrics.jsonl`` is written there alone, and Lightning's loggers log on rank 0 only).

A resumed run continues the same tracker run where the tracker can: MLflow and W&B by the run id
kept in ``trackers.json`` in the output folder, TensorBoard in the same log folder. CSV starts a
new ``logs/version_N`` per attempt, so nothing written before is overwritten. The steps trained
again after a resume (those after the checkpoint) are logged again: MLflow and TensorBoard then
hold two points for them, and W&B, which refuses a step below its last, keeps the first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lft.config import TrackerOptions
from lft.errors import ConfigError
from lft.output.files import atomic_write_text

#: The package each tracker needs, and the extra that installs it.
NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
STATE = "trackers.json"


def specs(loggers: list) -> list[TrackerOptions]:
    out = [TrackerOptions.model_validate({"name": item} if isinstance(item, str) else item) for item in loggers]
    names = [spec.name for spec in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"trainer.loggers: {', '.join(twice)} is listed more than once")
    return out


def check(loggers: list) -> None:
    """Every tracker listed once and its package installed: one-line errors, before the run starts."""
    for spec in specs(loggers):
        if spec.name != "csv":
            _needs(spec.name)


def _needs(name: str) -> None:
    import importlib.util

    package, extra = NEEDS[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f'trainer.loggers: {name} needs the {package} package: pip install -e ".[{extra}]" '
            f"(or pip install {package})"
        )


def _state(output: Path) -> dict:
    path = output / STATE
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def build(loggers: list, output: Path, resume: bool) -> list[Any]:
    """Lightning loggers for ``trainer.loggers`` (each tracker checked for its package first)."""
    from lightning.pytorch import loggers as pl_loggers

    state = _state(output) if resume else {}
    out: list[Any] = []
    for spec in specs(loggers):
        run_name = spec.run_name or output.resolve().name
        project = spec.project or "lft"
        if spec.name == "csv":
            out.append(pl_loggers.CSVLogger(output, name="logs"))  # a new version_N per attempt
            continue
        _needs(spec.name)
        if spec.name == "tensorboard":
            folder = Path(spec.tracking_uri) if spec.tracking_uri else output / "tensorboard"
            out.append(pl_loggers.TensorBoardLogger(folder, name=project, version=run_name, default_hp_metric=False))
        elif spec.name == "mlflow":
            uri = spec.tracking_uri or str(output / "mlruns")
            if ":" not in uri or Path(uri).is_absolute():  # a folder: an SQLite store in it
                Path(uri).mkdir(parents=True, exist_ok=True)
                uri = f"sqlite:///{(Path(uri) / 'mlflow.db').resolve()}"
            out.append(
                pl_loggers.MLFlowLogger(
                    experiment_name=project,
                    run_name=run_name,
                    tracking_uri=uri,
                    tags=dict(spec.tags) or None,
                    run_id=state.get("mlflow_run_id"),
                )
            )
        elif spec.name == "wandb":
            folder = Path(spec.tracking_uri) if spec.tracking_uri else output
            folder.mkdir(parents=True, exist_ok=True)
            labels = [f"{k}={v}" if v else k for k, v in spec.tags.items()]
            resumed = state.get("wandb_id")
            out.append(
                pl_loggers.WandbLogger(
                    name=run_name,
                    project=project,
                    save_dir=str(folder),
                    id=resumed,
                    resume="allow" if resumed else None,
                    tags=labels or None,
                )
            )
    return out


def remember(loggers: list[Any], output: Path) -> None:
    """Keep the tracker run ids in ``trackers.json``, for a resumed run to continue them."""
    from lightning.pytorch import loggers as pl_loggers

    state = _state(output)
    for logger in loggers:
        if isinstance(logger, pl_loggers.MLFlowLogger) and logger.run_id:
            state["mlflow_run_id"] = logger.run_id
        elif isinstance(logger, pl_loggers.WandbLogger):
            state["wandb_id"] = logger.version
    if state:
        atomic_write_text(output / STATE, json.dumps(state, indent=2) + "\n", "tracker state")


def numbers(record: dict) -> dict[str, float]:
    """The finite numbers of a record (nested dicts flattened with ``/``), for ``log_metrics``."""
    return {
        key: float(value)
        for key, value in flatten(record, sep="/").items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def publish(loggers: list[Any], record: dict) -> None:
    """One ``metrics.jsonl`` record to every logger, under the same names, at the record's step."""
    step = record.get("step")
    values = {k: v for k, v in numbers(record).items() if k != "step"}
    if not values or step is None:
        return
    for logger in loggers:
        logger.log_metrics(values, step=int(step))


def hyperparameters(loggers: list[Any], config: Any) -> None:
    """The resolved config, flattened, to every logger; a continued MLflow run keeps the values it
    has (MLflow refuses to change a logged parameter), a continued W&B run takes the new ones."""
    from lightning.pytorch import loggers as pl_loggers

    flat = flatten(config.model_dump(mode="json"))
    for logger in loggers:
        if isinstance(logger, pl_loggers.MLFlowLogger) and config.resume and logger._run_id:
            continue
        if isinstance(logger, pl_loggers.WandbLogger):
            logger.experiment.config.update(flat, allow_val_change=True)
        else:
            logger.log_hyperparams(flat)
        logger.save()


def flatten(data: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"trainer": {"lr": 1e-4}}`` -> ``{"trainer.lr": 1e-4}``; lists as text (trackers take scalars)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        return out
    key = prefix[: -len(sep)]
    out[key] = data if isinstance(data, (int, float, str, bool)) or data is None else json.dumps(data)
    return out


def summarise(loggers: list[Any], summary: dict, step: int) -> None:
    """The run's summary as ``summary/...`` metrics at the last step (W&B: also its run summary),
    then each logger closed."""
    from lightning.pytorch import loggers as pl_loggers

    values = {f"summary/{k}": v for k, v in numbers(summary).items()}
    for logger in loggers:
        if isinstance(logger, pl_loggers.CSVLogger):
            continue
        if values:
            logger.log_metrics(values, step=step)
        if isinstance(logger, pl_loggers.WandbLogger):
            logger.experiment.summary.update(values)
            logger.experiment.finish()
        else:
            logger.finalize("success")
