"""Pure tensor math for lft's objectives: tensors in, tensors out. No Lightning, no pluggy, no
transformers."""

from lft.losses.logprobs import linear_logprobs, logprobs_from_logits, shifted_logprobs
from lft.losses.sft import masked_nll

__all__ = ["linear_logprobs", "logprobs_from_logits", "masked_nll", "shifted_logprobs"]
