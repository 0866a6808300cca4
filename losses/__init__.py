"""Pure tensor math for lft's objectives: tensors in, tensors out. No Lightning, no pluggy, no
transformers."""

from lft.losses.bradley_terry import BradleyTerryLoss
from lft.losses.cpo import CPOLoss
from lft.losses.dpo import DPOLoss, HingeDPOLoss, IPOLoss, RobustDPOLoss
from lft.losses.logprobs import linear_logprobs, logprobs_from_logits, shifted_logprobs
from lft.losses.orpo import ORPOLoss
from lft.losses.preference import PairLogps, PairLoss, WithChosenNLL
from lft.losses.sft import masked_nll
from lft.losses.simpo import SimPOLoss

__all__ = [
    "BradleyTerryLoss",
    "CPOLoss",
    "DPOLoss",
    "HingeDPOLoss",
    "IPOLoss",
    "ORPOLoss",
    "PairLogps",
    "PairLoss",
    "RobustDPOLoss",
    "SimPOLoss",
    "WithChosenNLL",
    "linear_logprobs",
    "logprobs_from_logits",
    "masked_nll",
    "shifted_logprobs",
]
