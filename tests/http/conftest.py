"""Fixtures for the HTTP API tests: the gRPC tests' tiny Llama, its random adapters pushed
to a registry (a0..a7), and an OpenAI-compatible server over them (tests/http_harness.py)."""

from __future__ import annotations

import pytest
from adapterd.config import CacheConfig
from adapterd.metrics import Metrics
from prometheus_client import CollectorRegistry

from tests.grpc.conftest import (  # noqa: F401 - fixtures, shared with the gRPC tests
    MAX_RANK,
    parts_for,
    registry_resolver,
    registry_root,
    registry_store,
    tiny_base,
)
from tests.http_harness import OpenAIServer


@pytest.fixture
def openai_server(parts_for, registry_store):  # noqa: F811
    """openai_server(**config) -> an OpenAIServer on a0..a7 (4 slots), stopped after the test."""
    running: list[OpenAIServer] = []

    def start(*, gpu_slots: int = 4, **kw) -> OpenAIServer:
        parts = parts_for(gpu_slots)
        resolver = registry_resolver(registry_store, parts.spec)
        server = OpenAIServer.start(parts, resolver, registry=resolver.registry,
                                    cache=CacheConfig(gpu_slots=gpu_slots, max_rank=MAX_RANK),
                                    metrics=Metrics(CollectorRegistry()), **kw)
        running.append(server)
        return server

    yield start
    for s in running:
        s.stop()
