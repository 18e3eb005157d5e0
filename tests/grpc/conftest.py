"""Fixtures for the gRPC tests: the tiny Llama in NF4 with its LoRA slots (one load per slot
count for the session), random PEFT adapters (as directories, and pushed to a registry),
and `serve(...)`, which starts a real server on port 0 and stops it after the test."""

from __future__ import annotations

import shutil

import pytest
from adapterd.config import CacheConfig, ModelConfig
from adapterd.engine.parts import load_engine_parts
from adapterd.registry.store import Registry, RegistryResolver, open_storage

from tests.grpc_harness import TEST_SCHEDULER, RunningServer

ADAPTERS = [f"a{i}" for i in range(8)]
MAX_RANK = 16


@pytest.fixture(scope="session")
def tiny_base(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="session")
def registry_root(tiny_base, adapter_factory, tmp_path_factory):
    """ROOT/a0..a7: random PEFT adapters; ROOT/corrupt: garbage weights; ROOT/pickled: a .bin."""
    root = tmp_path_factory.mktemp("registry")
    for i, name in enumerate(ADAPTERS):
        shutil.copytree(adapter_factory(tiny_base, "llama", seed=100 + i, rank=4 + 4 * (i % 2)), root / name)
    shutil.copytree(root / "a0", root / "corrupt")
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (root / "pickled").mkdir()
    shutil.copy(root / "a0" / "adapter_config.json", root / "pickled")
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x02}q\x00.")
    return root


@pytest.fixture(scope="session")
def parts_for(tiny_base):
    """parts_for(gpu_slots) -> EngineParts of the tiny base, loaded once per slot count."""
    loaded = {}

    def get(gpu_slots: int):
        if gpu_slots not in loaded:
            loaded[gpu_slots] = load_engine_parts(
                ModelConfig(base_model=tiny_base), CacheConfig(gpu_slots=gpu_slots, max_rank=MAX_RANK)
            )
        return loaded[gpu_slots]

    return get


@pytest.fixture(scope="session")
def registry_store(registry_root, parts_for, tmp_path_factory):
    """A registry (registry/store.py) in a directory, with a0..a7 pushed as version 1 for the
    tiny base, as `adapterctl push` would: the servers resolve names through it."""
    root = tmp_path_factory.mktemp("store")
    registry = Registry(open_storage(root), spec=parts_for(8).spec, max_rank=MAX_RANK)
    for name in ADAPTERS:
        registry.push("default", name, registry_root / name)
    return root


def registry_resolver(root, spec) -> RegistryResolver:
    """What `adapterd serve` resolves names with: the registry at `root`."""
    return RegistryResolver(Registry(open_storage(root), spec=spec, max_rank=MAX_RANK))


@pytest.fixture
def serve(parts_for, registry_store):
    """serve(gpu_slots=8, resolver=None, scheduler=None, wait_ready=True, **cache_kw) -> RunningServer.
    The default resolver is the registry with a0..a7 (served as "a0@1", ...)."""
    running: list[RunningServer] = []

    def start(*, gpu_slots: int = 8, resolver=None, scheduler=None, wait_ready: bool = True, **cache_kw):
        parts = parts_for(gpu_slots)
        cache = CacheConfig(gpu_slots=gpu_slots, max_rank=MAX_RANK, **cache_kw)
        server = RunningServer.start(
            parts, resolver or registry_resolver(registry_store, parts.spec),
            scheduler=scheduler or TEST_SCHEDULER, cache=cache, wait_ready=wait_ready,
        )
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()
