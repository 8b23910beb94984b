"""Fine-tuning a causal language model with distributed ES: see finetune.py."""

from examples.finetune.finetune import Args, Echo, load_model, run

__all__ = ["Args", "Echo", "load_model", "run"]
