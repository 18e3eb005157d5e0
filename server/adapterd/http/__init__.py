"""The OpenAI-compatible HTTP API, served beside gRPC in the same process (server.py)."""
