"""QLoRA: LoRA adapters trained on a base model quantized to 4-bit NF4 (arXiv 2305.14314).

The base is quantized by bitsandbytes as it loads (``lft_quantization_config``), checked and
guarded right after loading (``lft_load_model`` wrapper), then frozen and given LoRA adapters
exactly as the ``lora`` plugin does, whose options it shares. 8-bit (LLM.int8) is an option.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

import lft
from lft.adapters import quantize
from lft.plugins.lora import LoRA, LoRAOptions


class QLoRAOptions(LoRAOptions):
    bits: Literal[4, 8] = Field(4, description="Quantize the frozen base to 4-bit (NF4/FP4) or 8-bit (LLM.int8).")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type; NF4 suits normally distributed weights."
    )
    double_quant: bool = Field(
        True, description="Also quantize the per-block scales (saves about 0.4 bits per weight)."
    )
    compute_dtype: Literal["auto", "bfloat16", "float32", "float16"] = Field(
        "auto", description="Dtype of the 4-bit matmuls. auto: bfloat16 where the run trains in bf16, else float32."
    )


class QLoRA(LoRA):
    """Model wrapper: a frozen, quantized base with LoRA adapters in full precision on top."""

    name = "qlora"
    kind = "wrapper"
    options = QLoRAOptions

    @lft.hookimpl
    def lft_quantization_config(self, config: Any) -> Any:
        return self.quantization(config)

    def quantization(self, config: Any) -> Any:
        opts = config.section(self.name)
        return quantize.bnb_config(opts.bits, opts.quant_type, opts.double_quant, self.compute_dtype(config))

    def compute_dtype(self, config: Any) -> str:
        chosen = config.section(self.name).compute_dtype
        if chosen != "auto":
            return chosen
        from lft.train.engine import resolve_precision

        precision = resolve_precision(config.trainer.precision, config.trainer.accelerator)
        return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"

    @lft.hookimpl(wrapper=True)
    def lft_load_model(self, config: Any) -> Any:
        loaded = yield
        if loaded is not None:
            self.check_quantized(loaded[0], config)
            quantize.guard_cpu_repack(loaded[0])
        return loaded

    def check_quantized(self, model: Any, config: Any) -> None:
        bits = config.section(self.name).bits
        if quantize.count_quantized(model, bits) == 0:
            model_config = getattr(model, "config", None)
            source = getattr(model_config, "_name_or_path", "") or config.model.path or "the model"
            kind = getattr(model_config, "model_type", type(model).__name__)
            raise lft.ModelError(
                f"{source}: model type {kind!r} cannot be quantized to {bits}-bit: bitsandbytes "
                f"found no linear layer to replace; train it with --plugin lora instead"
            )

    def wrap(self, model: Any, config: Any, objective: Any = None) -> Any:
        return super().wrap(quantize.prepare_for_training(model), config, objective)
