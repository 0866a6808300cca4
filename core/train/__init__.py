"""Training: the run from config to saved model, the LightningModule, callbacks, checkpoints,
numerical faults, distributed strategies and memory."""
