"""Model surgery: LoRA wrapping, quantization, merging and export. No pluggy, no Lightning."""
