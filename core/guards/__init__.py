"""Guards against the known pitfalls of fine-tuning, on by default in every run.

Before training (``RunGuards``, also ``lft check``): template lint, data lint, contamination.
During and after training (``GuardMonitor``, a Lightning callback): overfitting and early stopping,
repetition of sampled answers, forgetting (perplexity and KL against the base), adapter rank.
Every guard reports a ``Finding``; they end up in ``summary.json``, the console summary and the
run report. Options live in the ``guards`` config section (``lft config show`` lists them).
"""

from lft.guards.findings import Finding
from lft.guards.monitor import GuardMonitor
from lft.guards.options import GuardsOptions
from lft.guards.preflight import RunGuards

__all__ = ["Finding", "GuardMonitor", "GuardsOptions", "RunGuards"]
