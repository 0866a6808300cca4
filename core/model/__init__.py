"""Models: loading, forward passes and per-token log-probs, fused kernels, the reference policy."""
