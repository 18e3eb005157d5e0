"""The engine: one base model, batched LoRA over slots, generation with continuous batching.

Nothing here imports grpc: the engine is driven by a single loop thread (see loop.py).
"""
