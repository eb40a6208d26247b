"""megatron-multilora: train many LoRA adapters at once on one frozen megatron-core base."""

__version__ = "0.1.0"
