"""Checkpoints that survive a kill and never execute code when read.

A Lightning checkpoint (weights that train, optimizer and scheduler state, loop counters, the
data loader's position, callback states) is stored as ONE safetensors file: every tensor in
the nested checkpoint dict becomes a safetensors entry, and the structure around them (numbers,
strings, lists, tuples, dicts) is kept as JSON in the file's metadata. Reading it therefore
runs no pickle at all.

Every write (``lft.output.files.atomic_write``) goes to a temporary file in the same folder, is
flushed to disk, and is then renamed over the old file, so a kill or a full disk during a save
leaves the previous checkpoint in place and never a half-written file under the checkpoint's name.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lft.output.files import OutputError, atomic_write

FORMAT = "lft-checkpoint/1"
_TENSOR, _TUPLE, _DICT, _NDARRAY = "__lft_tensor__", "__lft_tuple__", "__lft_dict__", "__lft_ndarray__"


class CheckpointError(OutputError):
    """A checkpoint cannot be written or read."""


# -- the checkpoint format -----------------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: dict[int, str], where: str) -> Any:
    if torch.is_tensor(obj):
        tensor = obj.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else 0
        if ptr and ptr in storages:  # safetensors refuses tensors that share memory
            tensor = tensor.clone()
        key = str(len(tensors))
        tensors[key] = tensor
        if ptr:
            storages[ptr] = key
        return {_TENSOR: key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__lft_") for k in obj):
            return {k: _encode(v, tensors, storages, f"{where}.{k}") for k, v in obj.items()}
        return {
            _DICT: [
                [_encode(k, tensors, storages, where), _encode(v, tensors, storages, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    module = type(obj).__module__
    if module == "numpy":
        import numpy as np

        if isinstance(obj, np.ndarray):
            return {_NDARRAY: _encode(torch.from_numpy(obj.copy()), tensors, storages, where)}
        if isinstance(obj, np.generic):
            return obj.item()
    raise CheckpointError(
        f"cannot store {where} in a checkpoint: its type, {type(obj).__name__}, is not a "
        "tensor, number, string, list or dict"
    )


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((key, value),) = obj.items()
            if key == _TENSOR:
                return tensors[value]
            if key == _TUPLE:
                return tuple(_decode(v, tensors) for v in value)
            if key == _DICT:
                return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in value}
            if key == _NDARRAY:
                return _decode(value, tensors).numpy()
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def save(checkpoint: dict, path: str | Path) -> Path:
    """Write ``checkpoint`` (a nested dict) to ``path`` as safetensors, atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(checkpoint, tensors, {}, "checkpoint")
    metadata = {"format": FORMAT, "tree": json.dumps(tree)}
    return atomic_write(
        path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), "checkpoint", error=CheckpointError
    )


def _is_pickle(path: Path) -> bool:
    """A torch.save zip or a bare pickle, and not a safetensors file: that one starts with its
    header's length (8 bytes, little-endian, whose first byte may well be 0x80) and then ``{``."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load(path: str | Path) -> dict:
    """Read a checkpoint written by ``save``. A damaged or truncated file is a one-line
    ``CheckpointError``; a torch pickle checkpoint (from other tools) is read with
    ``torch.load(weights_only=True)``, which refuses anything but tensors and plain values."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    if _is_pickle(path):
        import pickle

        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{path} is a pickle checkpoint that holds more than tensors and plain values, "
                f"so lft refuses to unpickle it ({first})"
            ) from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise CheckpointError(f"{path} is a safetensors file but not an lft checkpoint")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return _decode(json.loads(metadata["tree"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is damaged or incomplete ({first})") from None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO for lft: safetensors files written atomically."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return load(path)


# -- random number generators --------------------------------------------------------------------


def rng_states() -> dict:
    """The global random states of this process: torch (CPU and CUDA), Python and numpy."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, inner, gauss = states["python"]
    random.setstate((version, tuple(inner), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(tuple(states["numpy"]))


class RngState(L.Callback):
    """Saves every process's random states in each checkpoint and restores them on resume, so a
    resumed run draws the same dropout masks and samples as an uninterrupted one."""

    @property
    def state_key(self) -> str:
        return "lft.RngState"

    def state_dict(self) -> dict:
        states = rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)  # every rank checkpoints together
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        ranks = state_dict.get("ranks") or []
        if not ranks:
            return
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        set_rng_states(ranks[rank % len(ranks)])
