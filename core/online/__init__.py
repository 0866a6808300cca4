"""Online methods' core: the default rollout and the reward hook."""
