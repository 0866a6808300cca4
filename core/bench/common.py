"""What both sides of the benchmark share: settings, data, and the machine's matmul peak."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("sft", "dpo", "orpo", "simpo", "grpo", "ppo")
#: Methods the peer has an equivalent for (trl 1.16 has no PPO).
PEER_METHODS = ("sft", "dpo", "orpo", "simpo", "grpo")
#: Methods whose peer trainer has a packed or padding-free variant.
PEER_PACKED = ("sft", "dpo")
#: The sides a run can compare (``--sides``): each tool at its defaults and packed.
SIDES = ("lft", "lft-packed", "lft-packed-checkpointed", "lft-vllm", "peer", "peer-packed", "peer-vllm")
#: Methods whose rollouts a vLLM side samples with vLLM (lft's ``--plugin vllm``; the peer's ``use_vllm``).
VLLM_METHODS = {"lft": ("grpo", "ppo"), "peer": ("grpo",)}
FORMS = {"sft": "sft", "dpo": "pref", "orpo": "pref", "simpo": "pref", "grpo": "prompts", "ppo": "prompts"}


@dataclass
class Settings:
    """One benchmark case, identical for both tools."""

    method: str
    model: str
    data: str
    steps: int = 20
    warmup: int = 3
    batch_size: int = 4
    max_length: int = 512
    lr: float = 2e-4
    precision: str = "bf16-mixed"
    lora_r: int = 16
    lora_alpha: int = 32
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    seed: int = 0
    beta: float = 0.1
    num_generations: int = 4
    max_new_tokens: int = 32
    threads: int = 0  # 0: torch's default
    #: Extra lft config keys (``--lft-set KEY=VALUE``), e.g. to measure an optimisation switched off.
    lft_overrides: dict = field(default_factory=dict)
    #: The side's packed variant: lft's ``data.packing`` (sft) or ``data.padding_free`` (the
    #: others); the peer's ``packing=True, padding_free=True`` (sft) or ``padding_free=True`` (dpo).
    packed: bool = False
    #: The side samples its rollouts with vLLM in the training process: lft's ``--plugin vllm``,
    #: the peer's ``use_vllm=True, vllm_mode="colocate"``.
    vllm: bool = False
    work: str = ""

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Settings":
        return cls(**json.loads(Path(path).read_text()))


def write_data(method: str, folder: Path, turns: int = 1, rows: int = 2000) -> Path:
    """The shipped task data in the conversational form both tools read.

    ``turns`` > 1 joins several problems into one multi-turn conversation, for length sweeps.
    """
    from lft.data import task

    form = FORMS[method]
    source = [json.loads(x) for x in task.path(form, "train").read_text().splitlines()]
    out = []
    if form == "sft":
        for i in range(0, len(source) - turns + 1, turns):
            prompt: list[dict] = []
            for row in source[i : i + turns - 1]:
                prompt += row["messages"]
            last = source[i + turns - 1]["messages"]
            out.append({"prompt": prompt + last[:1], "completion": last[1:]})
    elif form == "pref":
        for row in source:
            out.append(
                {
                    "prompt": [{"role": "user", "content": row["prompt"]}],
                    "chosen": [{"role": "assistant", "content": row["chosen"]}],
                    "rejected": [{"role": "assistant", "content": row["rejected"]}],
                }
            )
    else:
        for row in source:
            out.append({"prompt": [{"role": "user", "content": row["prompt"]}], "answer": row["answer"]})
    path = folder / f"{method}-t{turns}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in out[:rows]))
    return path


def matmul_peak(dtype_name: str, size: int = 0, repeat: int = 0, device: str = "cpu") -> float:
    """Measured FLOP/s of a square matmul in the given dtype on this machine's CPU, or on the
    first GPU with ``device="cuda"`` (a larger matrix, synchronised around the timed kernels)."""
    import torch

    cuda = device == "cuda"
    size, repeat = size or (8192 if cuda else 2048), repeat or (20 if cuda else 10)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(3 if cuda else 2):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    sync()
    return 2 * size**3 * repeat / (time.perf_counter() - start)


def flops_per_token(model_path: str, method: str) -> float:
    """Nominal model FLOPs per trained token, the same formula for both tools.

    With a frozen base (LoRA), a token costs a forward pass (2N) and the backward pass through
    the activations (2N); methods that score a reference policy add its forward (2N). N counts
    every matmul weight: the decoder blocks and the output projection (tied or not).
    """
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    h, inter, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter
    n = layers * per_layer + vocab * h
    factor = 4 + (2 if method in ("dpo", "ppo") else 0)
    return factor * n
