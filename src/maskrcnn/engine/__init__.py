"""Training, evaluation and checkpointing around the model."""
