"""The reference policy: the model as it was before training, for objectives that measure the
policy against it (DPO's log-ratio, PPO's and GRPO's KL penalty).

* A peft model is its own reference: the same weights with the adapter switched off, so no
  second copy is held.
* Any other model (full fine-tuning) is deep-copied once, before the first update, and frozen.

The engine builds one for an objective with ``needs_reference = True`` (``module.reference``).
Objectives whose reference log-probs depend only on the data can compute them once before
training with ``precompute``; the results are cached on disk under a key made of the reference
weights, the tokenizer, its chat template, the formatted data and the precision, so a changed
model, tokenizer, template or dataset never reads a stale entry.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from lft.errors import LftError
from lft.model.forward import eval_mode

#: Bump when the meaning of cached values changes.
CACHE_FORMAT = "lft-reference-v1"
_ADAPTER_MARKERS = ("lora_", "modules_to_save", "original_module")


def is_adapter_model(model: Any) -> bool:
    """A peft model whose adapter can be switched off (``disable_adapter``)."""
    return callable(getattr(model, "disable_adapter", None)) and hasattr(model, "peft_config")


class ReferencePolicy:
    """The frozen starting point of a policy.

    Use ``with reference.model() as ref: ...`` to run the reference (eval mode, no gradients).
    ``kind`` is ``"adapter-disabled"`` or ``"frozen-copy"``.
    """

    def __init__(self, policy: Any, frozen: Any | None):
        self.policy = policy
        self._frozen = frozen
        self.kind = "frozen-copy" if frozen is not None else "adapter-disabled"
        self.released = False

    @classmethod
    def of(cls, policy: Any) -> "ReferencePolicy":
        """The reference for ``policy``, taken now: call it before the first optimizer step."""
        if is_adapter_model(policy):
            return cls(policy, None)
        frozen = copy.deepcopy(policy)
        frozen.requires_grad_(False)
        frozen.eval()
        return cls(policy, frozen)

    @contextlib.contextmanager
    def model(self) -> Iterator[Any]:
        """The reference model, in eval mode with gradients off, for the duration."""
        if self.released:
            raise LftError(
                "the reference model was released after its log-probs were precomputed; "
                "this batch has no precomputed reference log-probs"
            )
        with torch.no_grad():
            if self._frozen is not None:
                device = next(self.policy.parameters()).device
                if next(self._frozen.parameters()).device != device:
                    self._frozen.to(device)
                yield self._frozen
                return
            with eval_mode(self.policy, grad=True), self.policy.disable_adapter():
                yield self.policy

    def release(self) -> None:
        """Drop the frozen copy (when every log-prob it is needed for has been precomputed)."""
        if self._frozen is not None:
            self._frozen = None
            self.released = True

    def fingerprint(self) -> str:
        """A digest of the reference's weights and config (adapters excluded)."""
        if self._frozen is not None:
            return weights_fingerprint(self._frozen)
        if self.released:
            raise LftError("the reference model was released")
        return weights_fingerprint(self.policy)


def weights_fingerprint(model: Any) -> str:
    """sha256 over the config and, per tensor, its name, shape, dtype, sum and sum of squares.

    Adapter tensors are skipped and peft's renaming is undone, so a base model has the same
    fingerprint with or without a (disabled) adapter around it.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if any(marker in name for marker in _ADAPTER_MARKERS):
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        values = tensor.detach().float()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(struct.pack("<dd", float(values.double().sum()), float(values.double().square().sum())))
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's vocabulary and rules, special tokens and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()


def data_fingerprint(features: Sequence[dict], keys: Sequence[str]) -> str:
    """sha256 of the formatted examples' ``keys`` (token ids and labels), in order."""
    digest = hashlib.sha256()
    for feature in features:
        for key in keys:
            digest.update(json.dumps(feature.get(key)).encode())
        digest.update(b";")
    return digest.hexdigest()


def cache_key(*parts: str) -> str:
    return hashlib.sha256("|".join((CACHE_FORMAT,) + tuple(parts)).encode()).hexdigest()[:32]


class ReferenceCache:
    """Precomputed reference values in ``root`` (default ``~/.cache/lft/reference``), one
    safetensors file per key, written atomically."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from lft.model.loading import cache_dir

            root = cache_dir() / "reference"
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str, names: Sequence[str], count: int) -> dict[str, torch.Tensor] | None:
        """The cached tensors for ``key``, or None when absent or not of the expected shape."""
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except Exception:  # a damaged entry is recomputed, never trusted
            return None
        if any(name not in tensors or tensors[name].shape != (count,) for name in names):
            return None
        return {name: tensors[name] for name in names}

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        from safetensors.torch import save_file

        from lft.output.files import atomic_write

        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        atomic_write(
            path,
            lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata),
            "reference cache",
        )
        return path


def precompute(
    reference: ReferencePolicy,
    features: list[dict],
    compute: Callable[[Any, dict], dict[str, torch.Tensor]],
    collate: Callable[[list[dict]], dict],
    names: Sequence[str],
    batch_size: int,
    key: str | None = None,
    cache: ReferenceCache | None = None,
    device: Any = None,
    context: Callable[[], Any] = contextlib.nullcontext,
) -> str:
    """Store the reference's values in every feature, as ``feature[name] = float``.

    :param compute: ``compute(reference_model, batch) -> {name: tensor of shape (B,)}``.
    :param collate: turns a list of features into a batch.
    :param key: the cache key (see ``cache_key``); with ``cache``, a hit is used and a miss is
        computed and written.
    :param context: entered around each forward pass (for example the trainer's autocast).
    :return: ``"cache"`` when read from the cache, else ``"computed"``.
    """
    stored = cache.load(key, names, len(features)) if cache is not None and key else None
    if stored is None:
        values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        with reference.model() as model:
            for start in range(0, len(features), batch_size):
                batch = collate(features[start : start + batch_size])
                batch = {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in batch.items()}
                with context():
                    out = compute(model, batch)
                for name in names:
                    values[name].append(out[name].detach().float().cpu())
        stored = {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in values.items()}
        if cache is not None and key:
            cache.save(key, stored, {"format": CACHE_FORMAT, "examples": str(len(features))})
        status = "computed"
    else:
        status = "cache"
    for name in names:
        for feature, value in zip(features, stored[name].tolist()):
            feature[name] = value
    return status
