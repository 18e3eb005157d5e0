"""adapterd: one 4-bit base model, many LoRA adapters, one gRPC server."""

__version__ = "0.1.0"
