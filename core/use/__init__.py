"""Using trained models: loading with adapters, generation and held-out evaluation."""
