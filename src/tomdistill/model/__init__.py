"""Model: loading causal LMs and adapters by config, and the LoRA distillation LightningModule."""
