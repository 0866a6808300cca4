"""The engine's own Lightning pieces: the run monitor (live progress and metric history) and the
Ctrl-C handler. Checkpoint writing lives in ``lft.train.checkpoint``."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import lightning as L
import torch

from lft.output.files import atomic_write_text
from lft.train.checkpoint import AtomicCheckpointIO
from lft.train.trackers import publish

__all__ = ["AtomicCheckpointIO", "GracefulStop", "RunMonitor", "Summarizes"]


@runtime_checkable
class Summarizes(Protocol):
    """A callback that adds its results to the run summary when training ends (the guards do)."""

    def summarize(self, summary: dict) -> None: ...


class GracefulStop(L.Callback):
    """Turns the first Ctrl-C (SIGINT) or SIGTERM into a clean stop after the current optimizer
    step, so the engine can save a checkpoint; a second Ctrl-C aborts at once.

    SIGTERM is taken over once training starts, from Lightning's own handler, which would end
    the process at the next batch with exit status 0 and no checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    def _handler(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            again = " (Ctrl-C again to abort)" if signum == signal.SIGINT else ""
            print(f"\n{name}: stopping after this step and saving a checkpoint{again}", file=sys.stderr)
        self.requested = True

    def _take(self, signum: int) -> None:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # signals can be set there only
            previous = signal.signal(signum, self._handler)
            self._previous.setdefault(signum, previous)

    def install(self) -> None:
        import signal

        self._take(signal.SIGINT)
        self._take(signal.SIGTERM)  # again in on_train_start, after Lightning sets its own

    def uninstall(self) -> None:
        import signal

        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        import signal

        self._last_step = trainer.global_step
        self._take(signal.SIGTERM)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        stepped = trainer.global_step != self._last_step
        self._last_step = trainer.global_step
        if not stepped:  # never stop halfway through gradient accumulation
            return
        if trainer.world_size > 1:  # a signal that reached one process stops them all at the same step
            self.requested = bool(trainer.strategy.reduce_boolean_decision(self.requested, all=False))
        if self.requested:
            trainer.should_stop = True


class RunMonitor(L.Callback):
    """Collects per-optimizer-step metrics (averaged over gradient accumulation), appends them to
    ``metrics.jsonl``, and shows a live progress line: step, loss, learning rate, tokens/s, the
    objective's ``progress_metrics`` (each name and the metrics it starts) and time left. Without a
    terminal it prints a plain line every ``print_every`` steps."""

    def __init__(self, output: Path, quiet: bool = False, print_every: int = 10, progress_metrics: Sequence[str] = ()):
        self.output = Path(output)
        self.progress_metrics = tuple(progress_metrics)
        self.quiet = quiet
        self.print_every = print_every
        self.history: list[dict] = []
        self.loggers: list[Any] = []  # the trainer's trackers, which get every record too
        self._pending: list[dict] = []
        self._progress: Any = None
        self._task: Any = None
        self._started = 0.0
        self._first_step = 0
        self._last_step = 0
        self._tokens = 0
        self._tokens_time = 0.0
        self._step_started = 0.0

    # -- lifecycle ---------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.loggers = list(trainer.loggers)
        self._started = time.perf_counter()
        self._step_started = self._started
        self._first_step = self._last_step = trainer.global_step
        if trainer.global_rank == 0:
            self._forget_after(trainer.global_step)
        if self.quiet or trainer.global_rank != 0:
            return
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TextColumn("eta"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=max(1, self._total(trainer)), completed=trainer.global_step, info=""
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._pending.append(dict(pl_module.last_metrics))
        self._tokens += _count_tokens(batch)
        step = trainer.global_step
        if step == self._last_step or not self._pending:
            return  # still accumulating gradients for this optimizer step
        self._last_step = step
        now = time.perf_counter()
        record = _average(self._pending)
        self._pending = []
        record["tokens"] = self._tokens
        if trainer.world_size > 1:
            record = _across_processes(record)
        record["step"] = step
        record["lr"] = _current_lr(trainer)
        record["step_time"] = now - self._step_started
        elapsed_tokens = now - self._step_started
        record["tokens_per_s"] = record["tokens"] / elapsed_tokens if elapsed_tokens > 0 else 0.0
        record["time"] = now - self._started
        self._step_started = now
        self._tokens = 0
        self.history.append(record)
        if trainer.global_rank == 0:
            self._write(record)
            self._show(trainer, record)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._step_started = time.perf_counter()  # evaluation time is not the next step's time
        value = trainer.callback_metrics.get("eval/loss")
        if value is not None and self.history:
            self.history[-1]["eval_loss"] = float(value)
            if trainer.global_rank == 0:
                self._write({"step": trainer.global_step, "eval_loss": float(value)})

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _total(trainer: L.Trainer) -> int:
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.max_steps
        try:
            return int(trainer.estimated_stepping_batches)
        except Exception:
            return 0

    def _write(self, record: dict) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.output / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(clean) + "\n")
        publish(self.loggers, record)

    def _forget_after(self, step: int) -> None:
        """On resume, drop the lines of steps after the checkpoint (they will be trained again)
        and any line cut short by a kill, so metrics.jsonl holds each step once."""
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(path, "".join(f"{line}\n" for line in kept), "metrics file")

    def _show(self, trainer: L.Trainer, record: dict) -> None:
        if self.quiet:
            return
        extras = "  ".join(
            f"{k} {v:.3g}" for k, v in record.items() if self.progress_metrics and k.startswith(self.progress_metrics)
        )
        info = (
            f"loss {record.get('loss', float('nan')):.4f}  lr {record['lr']:.2e}  "
            f"{record['tokens_per_s']:.0f} tok/s" + (f"  {extras}" if extras else "")
        )
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], info=info)
            return
        step, total = record["step"], self._total(trainer)
        if step == 1 or step % self.print_every == 0 or step == total:
            done = step - self._first_step
            eta = (total - step) * (record["time"] / done) if done > 0 and total else 0.0
            print(f"step {step}/{total}  {info}  eta {eta:.0f}s", flush=True)


def _count_tokens(batch: Any) -> int:
    if not isinstance(batch, dict):
        return 0
    count = 0
    for key, value in batch.items():
        if key.endswith("attention_mask") and torch.is_tensor(value):
            count += int(value.sum())
    return count


def _average(records: list[dict]) -> dict:
    keys = {k for r in records for k in r}
    out = {}
    for key in keys:
        values = [r[key] for r in records if key in r]
        out[key] = sum(values) / len(values)
    return out


def _across_processes(record: dict) -> dict:
    """The mean of each metric over all processes (token counts are summed)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, record)
    out = {}
    for key in {k for r in gathered for k in r}:
        values = [r[key] for r in gathered if key in r]
        out[key] = sum(values) if key == "tokens" else sum(values) / len(values)
    return out


def _current_lr(trainer: L.Trainer) -> float:
    try:
        return float(trainer.optimizers[0].param_groups[0]["lr"])
    except (IndexError, AttributeError):
        return 0.0
