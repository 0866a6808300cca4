"""One run, from config to saved model: select plugins, load, wrap, format data, fit, save,
evaluate, summarise. Every method-specific step goes through a hook."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from lft import config as cfgmod
from lft.data import task
from lft.data.files import read_rows, split_rows
from lft.data.format import Examples, format_rows
from lft.data.loader import LftDataModule
from lft.data.packing import KEYS as PACKED_KEYS
from lft.data.packing import pack, packable
from lft.errors import ConfigError, DataError, LftError, ModelError, PluginError
from lft.guards import RunGuards
from lft.model.forward import trainable_parameters
from lft.objective import Objective, as_objective
from lft.output.files import atomic_write_text
from lft.plugin.manager import PluginManager, Selection, plugin_name
from lft.train import distributed
from lft.train.callbacks import AtomicCheckpointIO, GracefulStop, RunMonitor, Summarizes
from lft.train.checkpoint import CheckpointError
from lft.train.module import LftModule
from lft.train.numerics import NonFiniteError
from lft.use import evaluate

log = logging.getLogger("lft")
CHECKPOINTS = "checkpoints"
FINAL = "final"


@dataclass
class RunResult:
    """What ``lft.run`` returns: the summary metrics, the per-step history and the paths."""

    output: Path
    final: Path | None
    metrics: dict
    history: list[dict] = field(default_factory=list)
    config: Any = None

    def __repr__(self) -> str:
        return f"RunResult(output={str(self.output)!r}, steps={self.metrics.get('steps')}, final={str(self.final)!r})"


def quiet_libraries() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`.*")
    warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # Online methods optimise manually; the step's checkpoint is meant to hold the state after it.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # peft, saving an adapter whose base is another adapter folder (merged on load, see lft.model.loading)
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .*vocabulary was not modified")


def config_data(config: Any) -> dict:
    """A run's raw settings, not yet validated, from a RunConfig (the fields it set), a dict
    (dotted keys allowed), a YAML path, or None for every default."""
    if isinstance(config, cfgmod.RunConfigBase):
        return config.model_dump(exclude_unset=True)
    if isinstance(config, (str, Path)):
        return cfgmod.read_yaml(config)
    if config is None:
        return {}
    if isinstance(config, dict):
        data: dict = {}
        for key, value in config.items():
            if "." in key:
                cfgmod.set_dotted(data, key, value)
            else:
                data[key] = value
        return data
    raise ConfigError(f"expected a RunConfig, a dict or a YAML path, got {type(config).__name__}")


@dataclass
class Resolved:
    """A run's validated config and its plugins, with what the objective's default data added."""

    config: Any
    selection: Selection
    default_data: bool = False
    #: ``KEY=VALUE`` of the default data's suggested settings that were applied (the user left them unset).
    applied: list[str] = field(default_factory=list)


def resolve(data: dict, manager: PluginManager, extra: Iterable[str] = (), source: str = "config") -> Resolved:
    """Select the plugins, add the objective's default data and its suggested settings for every
    key the user left unset, resolve ``trainer.precision=auto``, then validate the config, once."""
    data = copy.deepcopy(data)
    cls = cfgmod.config_class(cfgmod.plugin_sections(manager))
    listed = data.get("plugins")
    if listed is not None and not isinstance(listed, list):
        cfgmod.build(data, cls, source)  # reports the bad value, with every other problem, in one error
    names = [*(listed if isinstance(listed, list) else []), *extra]
    selection = manager.select(names)
    if listed is None or any(n not in listed for n in extra):
        data["plugins"] = [*(listed or []), *[n for n in extra if n not in (listed or [])]]
    resolved = Resolved(None, selection)
    if cfgmod.get_dotted(data, "data.train") is None:
        default = selection.hook.lft_default_data()
        if not default:
            raise DataError("no training data: give --data FILE (the selected objective has no default data)")
        cfgmod.set_dotted(data, "data.train", default["train"])
        if cfgmod.get_dotted(data, "data.eval") is None and default.get("eval"):
            cfgmod.set_dotted(data, "data.eval", default["eval"])
        resolved.default_data = True
        for key, value in (default.get("settings") or {}).items():
            if cfgmod.get_dotted(data, key, cfgmod.MISSING) is cfgmod.MISSING:
                cfgmod.set_dotted(data, key, value)
                resolved.applied.append(f"{key}={value}")
    resolve_raw_precision(data)
    resolved.config = cfgmod.build(data, cls, source)
    return resolved


def resolve_raw_precision(data: dict) -> None:
    """Set ``trainer.precision`` in raw (not yet validated) settings when it is ``auto`` or unset."""
    trainer = data.get("trainer")
    if not isinstance(trainer, dict):
        trainer = {}
    precision = trainer.get("precision", "auto")
    if precision == "auto":
        cfgmod.set_dotted(
            data, "trainer.precision", resolve_precision(precision, str(trainer.get("accelerator", "auto")))
        )


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    from lft.train.numerics import native_bf16_cpu

    return "bf16-mixed" if native_bf16_cpu() else "32-true"


def run(
    config: Any = None,
    plugins: Iterable[Any] = (),
    quiet: bool = False,
    console: Any = None,
    manager: PluginManager | None = None,
) -> RunResult:
    """Run one fine-tuning job.

    :param config: a ``RunConfig``, a dict (dotted keys allowed, e.g. ``{"lora.r": 32}``), a path
        to a YAML file, or None for every default (LoRA SFT of the embedded model on the
        embedded task).
    :param plugins: extra plugin objects (or classes) to register and select for this run; one
        with the name of an installed plugin replaces it, so a subclass of a built-in method
        takes its place.
    :param quiet: print nothing.
    :param manager: the plugin manager to use (the command line passes its own), else a new one.
    :return: a ``RunResult`` with the summary metrics, per-step history and output paths.
    """
    quiet_libraries()
    extra = list(plugins)
    if manager is None:
        manager = PluginManager(extra=extra)
    else:
        for obj in extra:
            manager.add(obj)
    names = [plugin_name(obj() if isinstance(obj, type) else obj) for obj in extra]
    resolved = resolve(
        config_data(config), manager, names, str(config) if isinstance(config, (str, Path)) else "config"
    )
    return Run(resolved, quiet=quiet, console=console).execute()


class Run:
    def __init__(self, resolved: Resolved, quiet: bool = False, console: Any = None):
        from rich.console import Console

        config, selection = resolved.config, resolved.selection
        self.resolved = resolved
        self.config = config
        self.selection = selection
        self.hook = selection.hook
        self.main = distributed.is_main_process()  # only the main process writes outputs
        self.quiet = quiet or not self.main
        self.console = console or Console(quiet=self.quiet)
        self.output = Path(config.output).expanduser()
        self.stream: dict | None = None  # data.streaming: what the training loader reads (read_stream)
        self.summary: dict[str, Any] = {
            "objective": selection.objective,
            "wrapper": selection.wrapper,
            "extensions": selection.extensions,
            "defaults_used": selection.defaults,
        }
        self.objective = as_objective(self.hook.lft_objective(config=config), selection.objective)
        self.summary.update(
            progress_metrics=list(self.objective.progress_metrics),
            summary_metrics=["loss", *self.objective.summary_metrics],
        )
        self.guards = RunGuards(config, selection, self.console, self.objective)

    # -- steps -----------------------------------------------------------------------------------
    def check_output(self) -> Path | None:
        """The checkpoint to resume from, if any. Touches nothing: a run that fails on its
        config, model or data leaves an earlier run's output folder as it was."""
        cfg = self.config
        ckpt = self.output / CHECKPOINTS / "last.ckpt"
        if cfg.resume:
            if not ckpt.exists():  # a file, or a folder for sharded strategies
                raise LftError(f"nothing to resume: no checkpoint at {ckpt}")
            return ckpt
        if self.main and self.output.exists() and any(self.output.iterdir()) and not cfg.overwrite:
            raise LftError(
                f"output folder {self.output} already exists and is not empty; pass --overwrite "
                f"to replace it, --resume to continue its run, or choose another --output"
            )
        return None

    def prepare_output(self) -> None:
        """Empty the output folder (--overwrite) and write the resolved config, just before training."""
        if not self.main:
            return
        if not self.config.resume and self.output.exists() and self.config.overwrite:
            shutil.rmtree(self.output)
        self.output.mkdir(parents=True, exist_ok=True)
        for stale in (self.output / CHECKPOINTS).glob(".*.tmp-*"):  # left by a save that was killed
            stale.unlink(missing_ok=True)
        atomic_write_text(self.output / "config.yaml", self.config.to_yaml(), "config")

    def load(self) -> tuple[Any, Any]:
        quantization = self.hook.lft_quantization_config(config=self.config)
        loaded = self.hook.lft_load_model(config=self.config, quantization_config=quantization)
        if loaded is None:
            raise ModelError("no plugin could load the model")
        model, tokenizer = loaded
        self.guards.generation_config = getattr(model, "generation_config", None)
        self.guards.model = model  # the base, before any wrapping
        self.summary["model"] = getattr(getattr(model, "config", None), "_name_or_path", "") or str(
            self.config.model.path
        )
        return model, tokenizer

    def read_data(self, tokenizer: Any) -> tuple[list[dict], list[dict], dict]:
        cfg = self.config
        if cfg.data.streaming:
            return self.read_stream(tokenizer)
        from lft.data.files import interleave, mix, read_source, sources

        eval_spec = cfg.data.eval
        mixture = sources(cfg.data.train)
        parts = [read_source(source, cfg.data.split) for source in mixture]
        train_spec = " + ".join(source.path for source in mixture)
        eval_rows = read_rows(eval_spec, cfg.data.split) if eval_spec else None
        if eval_rows is None and cfg.data.eval_split > 0:  # held out of each source before any row repeats
            held = []
            for i, part in enumerate(parts):
                parts[i], out = split_rows(part, cfg.data.eval_split, cfg.trainer.seed)
                held.append(out)
            eval_rows = interleave(held)  # so a cap on the held-out rows takes from every source
        drawn = [len(part) for part in parts]
        if len(parts) == 1:
            train_rows = parts[0]
        else:
            train_rows, drawn = mix(parts, [source.weight for source in mixture], cfg.trainer.seed)
            self.console.print(
                "mixture: "
                + "; ".join(
                    f"{source.path} (weight {source.weight:g}): {drawn_rows} of {len(part)} rows"
                    for source, part, drawn_rows in zip(mixture, parts, drawn)
                )
            )
        if eval_rows is not None and cfg.data.max_eval_rows and len(eval_rows) > cfg.data.max_eval_rows:
            eval_rows = eval_rows.subset(list(range(cfg.data.max_eval_rows)))
        train_rows = self.guards.preflight(tokenizer, train_rows, eval_rows)
        self.baseline_source = train_rows.rows[:2000]  # the prompting baseline's system prompt and examples
        train, train_stats = format_rows(train_rows, self.hook, tokenizer, cfg)
        self.guards.formatted(train_stats)
        evals, eval_stats = format_rows(eval_rows, self.hook, tokenizer, cfg) if eval_rows is not None else ([], None)
        examples = len(train)
        train = self.pack(train)
        info: dict[str, Any] = {
            "train_file": train_spec,
            "eval_file": eval_spec or ("split" if evals else None),
            "train_examples": examples,
            "eval_examples": len(evals),
            "truncated": train_stats.truncated,
            "dropped": train_stats.dropped,
            "skipped": train_stats.skipped,
            "longest": train_stats.longest,
            "trained_tokens": train_stats.trained_tokens,
        }
        if len(parts) > 1:
            info["sources"] = [
                {"path": source.path, "weight": source.weight, "rows": len(part), "drawn": count}
                for source, part, count in zip(mixture, parts, drawn)
            ]
        if cfg.data.packing:
            info["packed_rows"] = len(train)
            self.console.print(
                f"[dim]packed {examples} examples into {len(train)} rows of up to {cfg.data.max_length} tokens[/]"
            )
        for note in train_stats.notes:
            self.console.print(f"[yellow]note:[/] {note}")
        if train_stats.truncated or train_stats.dropped:
            self.console.print(
                f"[yellow]note:[/] {train_stats.truncated} training example(s) truncated and "
                f"{train_stats.dropped} dropped at data.max_length={cfg.data.max_length}"
            )
        return train, evals, info

    def read_stream(self, tokenizer: Any) -> tuple[list[dict], list[dict], dict]:
        """``data.streaming``: the held-out rows and a bounded sample for the guards, read now; the
        training rows later, as training takes them (``lft.data.stream``)."""
        from lft.data.files import sources
        from lft.data.stream import head, held_out

        cfg = self.config
        if cfg.trainer.max_steps <= 0:
            raise ConfigError("data.streaming=true needs trainer.max_steps: a stream has no length to count epochs by")
        if cfg.data.packing:
            raise ConfigError(
                "data.streaming=true cannot pack (data.packing needs every row at once); set data.packing=false"
            )
        guards = cfg.section("guards")
        if guards.enabled and (guards.contamination.drop or guards.forgetting.mix_ratio > 0):
            key = "guards.contamination.drop" if guards.contamination.drop else "guards.forgetting.mix_ratio"
            raise ConfigError(
                f"data.streaming=true cannot apply {key}: it changes the training rows, which a stream reads "
                "only as training takes them; turn it off, or train without streaming"
            )
        mixture = sources(cfg.data.train)
        heads, eval_rows = [0] * len(mixture), None
        if cfg.data.eval:
            eval_rows = read_rows(cfg.data.eval, cfg.data.split)
        elif cfg.data.eval_split > 0:
            eval_rows, heads = held_out(mixture, cfg.data.split, cfg.data.max_eval_rows or 100)
        if eval_rows is not None and cfg.data.max_eval_rows and len(eval_rows) > cfg.data.max_eval_rows:
            eval_rows = eval_rows.subset(list(range(cfg.data.max_eval_rows)))
        sample = head(mixture, cfg.data.split, cfg.trainer.seed, heads, cfg.data.streaming_sample)
        self.guards.preflight(tokenizer, sample, eval_rows)
        features, stats = format_rows(sample, self.hook, tokenizer, cfg)
        self.guards.formatted(stats)
        evals = format_rows(eval_rows, self.hook, tokenizer, cfg)[0] if eval_rows is not None else []
        self.stream = {"mixture": mixture, "heads": heads}
        self.console.print(
            f"[dim]streaming {' + '.join(s.path for s in mixture)}: the preflight guards checked the first "
            f"{len(sample)} training rows"
            + (f"; the first {', '.join(map(str, heads))} rows of each source are held out" if any(heads) else "")
            + "[/]"
        )
        info: dict[str, Any] = {
            "train_file": " + ".join(s.path for s in mixture),
            "eval_file": cfg.data.eval or ("the sources' first rows" if any(heads) else None),
            "streaming": True,
            "train_examples": len(features),  # of the guards' sample; the stream itself has no count
            "sampled_rows": len(sample),
            "eval_examples": len(evals),
            "truncated": stats.truncated,
            "dropped": stats.dropped,
            "skipped": stats.skipped,
            "longest": stats.longest,
            "trained_tokens": stats.trained_tokens,
        }
        return features, evals, info

    def pack(self, train: Examples) -> Examples:
        """The training examples packed into rows (``data.packing``), checked for packing when
        ``data.padding_free`` concatenates each batch instead; as they are otherwise."""
        data = self.config.data
        if not (data.packing or data.padding_free is True):
            return train  # auto drops the padding where the objective and the examples allow it
        key = "data.packing" if data.packing else "data.padding_free"
        if not data.packing and self.objective.runs_padding_free and not self.objective.reads_packed_rows:
            return train  # its forward passes drop the padding themselves
        if not self.objective.reads_packed_rows:
            which = "e.g. sft" if data.packing else "sft; dpo, orpo, simpo, grpo and ppo run padding-free"
            raise ConfigError(
                f"{key}: the {self.selection.objective} objective does not train on packed rows "
                f"(objectives that do: {which}); set {key}=false"
            )
        if not packable(train):
            columns = sorted({k for f in train for k in f} - set(PACKED_KEYS))
            raise ConfigError(
                f"{key}: the examples carry {', '.join(columns)} besides input_ids and labels, "
                f"which cannot be packed; set {key}=false"
            )
        if not data.packing:
            return train
        rows, where = pack(train, data.max_length, train.where)
        return Examples(rows, where)

    def task_rows(self, train_spec: str) -> list[dict] | None:
        return evaluate.task_rows(self.config.eval, train_spec)

    def measure(self, module: LftModule, datamodule: LftDataModule, task_rows: list[dict] | None) -> dict:
        """The objective's own held-out loss and metrics, then its method-independent measurements
        of the same rows (they win where names meet: they cover the whole set exactly), then the
        task metric; computed by the same code as ``lft eval``."""
        settings = evaluate.Settings.from_config(self.config)
        out: dict[str, Any] = {}
        if datamodule.eval_features:
            out.update(evaluate.objective_loss(module, datamodule.eval_loader()))
            out.update(module.objective.measure(module.model, module.tokenizer, datamodule.eval_features, settings))
        out = {f"eval_{k}": v for k, v in out.items()}
        if task_rows:
            out.update(evaluate.task_measure(module.model, module.tokenizer, task_rows, settings))
        return out

    def measure_baselines(self, module: LftModule, task_rows: list[dict]) -> None:
        """The base model with a system prompt and with solved examples on the task's prompts."""
        from lft.guards import baseline

        cfg = self.config
        source = getattr(self, "baseline_source", [])
        system = cfg.eval.system_prompt or baseline.system_prompt_of(source) or task.INSTRUCTION
        shots = baseline.shot_examples(source, self.objective.row_texts, cfg.eval.shots, cfg.trainer.seed)
        self.console.print("[dim]measuring the prompting baselines...[/]")
        settings = evaluate.Settings.from_config(cfg)  # as the task metric before and after training
        self.summary["baselines"] = baseline.measure(module.model, module.tokenizer, task_rows, system, shots, settings)
        self.summary["baseline_rows"] = len(task_rows)

    def trainer(self, monitor: RunMonitor, stop: GracefulStop, manual: bool = False) -> Any:
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint

        from lft.train import trackers

        tc = self.config.trainer
        callbacks: list[Any] = [monitor]
        if tc.checkpoint_every > 0:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=self.output / CHECKPOINTS,
                    filename="last",
                    monitor=None,
                    every_n_train_steps=tc.checkpoint_every,
                    save_top_k=1,
                    enable_version_counter=False,
                    save_on_train_epoch_end=False,
                )
            )
        for extra in self.hook.lft_callbacks(config=self.config):
            callbacks.extend(extra or [])
        callbacks.append(stop)  # last, so it sees a stop requested by any callback in the same step
        kwargs: dict[str, Any] = {}
        eval_every = self.guards.eval_every or tc.eval_every
        if eval_every > 0:
            kwargs.update(
                val_check_interval=eval_every * (1 if manual else tc.grad_accum), check_val_every_n_epoch=None
            )
        else:
            kwargs.update(limit_val_batches=0)
        return L.Trainer(
            accelerator=tc.accelerator,
            devices=tc.devices,
            num_nodes=tc.num_nodes,
            strategy=distributed.strategy(tc),
            precision=tc.precision,
            max_steps=tc.max_steps,
            max_epochs=-1 if tc.max_steps > 0 else tc.epochs,
            # An objective that steps the optimizer itself (manual optimization) clips and accumulates itself.
            accumulate_grad_batches=1 if manual else tc.grad_accum,
            gradient_clip_val=None if manual else tc.max_grad_norm,
            callbacks=callbacks,
            plugins=[AtomicCheckpointIO()],
            logger=trackers.build(tc.loggers, self.output, resume=self.config.resume),
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=tc.checkpoint_every > 0,
            use_distributed_sampler=False,  # ResumableLoader shards by rank itself
            default_root_dir=self.output,
            **kwargs,
        )

    def save_progress(self, trainer: Any) -> str:
        """Checkpoint a run that failed mid-way, and say where (empty before the first step)."""
        if trainer.global_step == 0:
            return ""
        target = self.output / CHECKPOINTS / "last.ckpt"
        try:
            trainer.save_checkpoint(target)
        except Exception:  # the failure may have left nothing saveable; the periodic checkpoints stay
            return f" (checkpoints so far are kept in {target.parent})"
        return f"; a checkpoint at step {trainer.global_step} was saved in {target.parent}; continue with --resume"

    def save_final(self, module: LftModule) -> Path:
        """Save the trained model (adapter or full) with its tokenizer and config, atomically."""
        final = self.output / FINAL
        tmp = self.output / f".{FINAL}.tmp"
        old = self.output / f".{FINAL}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            saved = self.hook.lft_save_model(
                model=module.model, tokenizer=module.tokenizer, path=str(tmp), config=self.config
            )
            if saved is None:
                raise LftError("no plugin saved the model")
            (tmp / "lft_config.yaml").write_text(self.config.to_yaml(), encoding="utf-8")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
        except OSError as exc:  # a full disk: the checkpoint is whole, so --resume can save again
            shutil.rmtree(tmp, ignore_errors=True)
            raise LftError(
                f"could not save the final model in {final}: {exc.strerror or exc}; the checkpoint in "
                f"{self.output / CHECKPOINTS} is kept; free some space and continue with --resume"
            ) from None
        shutil.rmtree(old, ignore_errors=True)
        return final

    def collect_objective_report(self, objective: Objective) -> None:
        """An objective's ``notes`` (a dict) and ``warnings`` (a list of lines) go into the summary."""
        if objective.notes:
            self.summary["notes"] = dict(objective.notes)
        if objective.warnings:
            self.summary.setdefault("warnings", []).extend(str(w) for w in objective.warnings)

    # -- the run -----------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        started = time.perf_counter()
        cfg = self.config
        distributed.validate(cfg.trainer)
        from lft.train import trackers

        trackers.check(cfg.trainer.loggers)  # before anything in the output folder changes
        resume_from = self.check_output()
        if cfg.trainer.release_freed_memory:
            from lft.train.memory import release_freed_memory

            release_freed_memory()
        import lightning as L

        L.seed_everything(cfg.trainer.seed, workers=True, verbose=False)
        self.console.print(
            f"[bold]lft run[/]: {self.selection.describe()}"
            + (f"  [dim](defaults: {', '.join(self.selection.defaults)})[/]" if self.selection.defaults else "")
        )
        if self.resolved.default_data:
            self.summary["data_default"] = True
        if self.resolved.applied:
            self.summary["default_data_settings"] = self.resolved.applied
            self.console.print(
                f"[dim]embedded task settings: {', '.join(self.resolved.applied)} (set them to override)[/]"
            )
        objective = self.objective
        model, tokenizer = self.load()
        train, evals, data_info = self.read_data(tokenizer)
        self.summary["data"] = data_info
        wrapped = self.hook.lft_wrap_model(model=model, config=cfg, objective=objective)
        if wrapped is None:
            raise PluginError(f"the model wrapper {self.selection.wrapper!r} returned no model")
        trainable, total = trainable_parameters(wrapped)
        self.summary.update(trainable_params=trainable, total_params=total)
        module = LftModule(wrapped, tokenizer, objective, self.hook, cfg)
        datamodule = LftDataModule(train, evals, self.hook, tokenizer, cfg, objective, stream=self.stream)
        task_rows = self.task_rows(data_info["train_file"])
        self.console.print(
            f"model {self.summary['model']} · trainable {trainable:,} of {total:,} parameters · "
            f"{len(train)} train / {len(evals)} eval examples · precision {cfg.trainer.precision}"
        )
        module.prepare()
        if cfg.eval.before and resume_from is None and self.main:
            self.console.print("[dim]measuring the model before training...[/]")
            self.summary["before"] = self.measure(module, datamodule, task_rows)
            if cfg.eval.baseline and task_rows:
                self.measure_baselines(module, task_rows)
        self.prepare_output()
        monitor = RunMonitor(self.output, quiet=self.quiet, progress_metrics=objective.progress_metrics)
        stop = GracefulStop()
        trainer = self.trainer(monitor, stop, manual=not module.automatic_optimization)
        if self.main:
            from lft.train import trackers

            trackers.hyperparameters(trainer.loggers, cfg)
            trackers.remember(trainer.loggers, self.output)
        fit_started = time.perf_counter()
        stop.install()
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
        except (CheckpointError, NonFiniteError):
            raise  # these keep the last good checkpoint, and say so; saving now would replace it
        except LftError as exc:  # a one-line error from a plugin mid-run: keep the progress made so far
            raise type(exc)(f"{exc}{self.save_progress(trainer)}") from None
        finally:
            stop.uninstall()
            monitor.close()
        train_time = time.perf_counter() - fit_started
        if stop.requested:
            trainer.save_checkpoint(self.output / CHECKPOINTS / "last.ckpt")
            raise LftError(
                f"interrupted at step {trainer.global_step}; a checkpoint was saved in "
                f"{self.output / CHECKPOINTS}; continue with --resume"
            )
        trainer.save_checkpoint(self.output / CHECKPOINTS / "last.ckpt")
        with distributed.full_weights(trainer, module.model):
            final = self.save_final(module) if trainer.global_rank == 0 else None
        if trainer.global_rank != 0:  # evaluation and the summary are the main process's job
            return RunResult(self.output, None, {"rank": trainer.global_rank}, monitor.history, cfg)
        self.summary["after"] = self.measure(module, datamodule, task_rows)
        self.collect_objective_report(objective)
        history = monitor.history
        from lft.output.summary import reward_task_warning

        hacking = reward_task_warning(self.summary, history, objective.reward_metric)
        if hacking:
            self.summary.setdefault("warnings", []).append(hacking)
        self.summary.update(
            steps=trainer.global_step,
            processes=trainer.world_size,
            train_time_s=round(train_time, 2),
            total_time_s=round(time.perf_counter() - started, 2),
            first_loss=history[0].get("loss") if history else None,
            last_loss=history[-1].get("loss") if history else None,
            tokens_per_s=(sum(h["tokens"] for h in history) / sum(h["step_time"] for h in history))
            if history
            else None,
            output=str(self.output),
            final=str(final) if final else None,
        )
        self.guards.finish(self.summary)
        if self.summary.get("baselines"):
            from lft.guards import baseline
            from lft.guards.findings import add_to_summary

            add_to_summary(self.summary, [baseline.verdict(self.summary)])
        for callback in trainer.callbacks:  # a callback may add its results (guards, monitors) to the summary
            if isinstance(callback, Summarizes):
                callback.summarize(self.summary)
        from lft.output.report import write_report
        from lft.output.summary import print_summary, write_summary

        if trainer.global_rank == 0:
            self.summary["report"] = [str(p) for p in write_report(self.output, self.summary, history, cfg)]
        write_summary(self.output, self.summary)
        from lft.train import trackers

        trackers.summarise(trainer.loggers, self.summary, trainer.global_step)
        if not self.quiet:
            print_summary(self.console, self.summary)
        return RunResult(self.output, final, self.summary, history, cfg)
