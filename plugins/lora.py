"""LoRA: train small low-rank adapters on a frozen base model (arXiv 2106.09685)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

import lft
from lft.adapters.lora import apply_lora
from lft.config import Section


class LoRAOptions(Section):
    r: int = Field(16, gt=0, description="Adapter rank. Start at 16; raise it if eval metrics plateau.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Union[Literal["attention", "all-linear"], list[str]] = Field(
        "attention", description="attention (q/k/v/o projections), all-linear, or a list of layer names."
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA).")
    frozen_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Storage dtype of the frozen base's linear layers. auto: bfloat16 when the run trains "
        "with bf16-mixed precision (its matmuls run in bf16 already, so the maths is unchanged and the base takes "
        "half the memory), except for online methods on a CPU without bf16 arithmetic, which sample in float32; "
        "else float32.",
    )


class LoRA:
    """Model wrapper: the base stays frozen; only LoRA adapters train. Saves a peft adapter."""

    name = "lora"
    kind = "wrapper"
    options: type[LoRAOptions] = LoRAOptions

    @lft.hookimpl
    def lft_add_config(self, register: Any) -> None:
        register(self.name, self.options)

    @lft.hookimpl
    def lft_wrap_model(self, model: Any, config: Any, objective: Any) -> Any:
        return self.wrap(model, config, objective)

    def wrap(self, model: Any, config: Any, objective: Any = None) -> Any:
        """Freeze ``model`` and add the adapters described by this plugin's section."""
        opts = config.section(self.name)
        if config.trainer.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        try:
            wrapped = apply_lora(
                model, opts.r, opts.alpha, opts.dropout, opts.target_modules, opts.bias, opts.use_rslora
            )
        except ValueError as exc:
            raise lft.ConfigError(str(exc)) from None
        wrapped.train()
        self.store_frozen(wrapped, config, objective)
        return wrapped

    def store_frozen(self, model: Any, config: Any, objective: Any = None) -> None:
        choice = config.section(self.name).frozen_dtype
        if choice == "auto":
            from lft.train.engine import resolve_precision

            precision = resolve_precision(config.trainer.precision, config.trainer.accelerator)
            choice = (
                "bfloat16"
                if precision.startswith("bf16") and not self.samples_in_float32(config, objective)
                else "float32"
            )
        if choice == "bfloat16":
            import torch

            from lft.adapters.lora import store_frozen_linears

            store_frozen_linears(model, torch.bfloat16)

    @staticmethod
    def samples_in_float32(config: Any, objective: Any) -> bool:
        """An online objective on a CPU without bf16 arithmetic samples in float32 (see
        ``lft.online.rollout``), so its base stays float32."""
        import torch

        from lft.online.rollout import samples_in_float32

        online = objective is not None and objective.online
        on_gpu = config.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        return online and samples_in_float32("cuda" if on_gpu else "cpu", torch.bfloat16)
