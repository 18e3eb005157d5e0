"""Training: a dataset in, a served adapter out.

    spec.py      what a job asks for, with the hosted-API defaults
    data.py      the JSONL formats, checked line by line; completion-only labels
    store.py     a job's record, its states, the SQLite store of jobs and their events
    jobs.py      the JobManager: create, read, cancel, follow; the queue
    runner.py    one running job: its worker process, followed until it settles
    worker.py    the QLoRA training process (transformers' Trainer on PEFT)
    evaluate.py  loss, perplexity and ROUGE of the adapter beside the base model

Nothing here imports grpc; services/training.py is the RPC face of the JobManager.
"""

from __future__ import annotations


def registry_publisher(registry):
    """jobs.Publish on a registry.store.Registry: the trained adapter goes through the
    registry's own checks as the next version of its name, marked as trained."""

    def publish(tenant: str, name: str, adapter_dir, *, job_id: str, description: str, metrics: dict) -> str:
        version = registry.push(tenant, name, adapter_dir, description=description, source="trained",
                                job_id=job_id, metrics=metrics)
        return version.ref

    return publish


def open_jobs(config, registry, metrics=None):
    """The server's JobManager (started: what a previous run left is settled, queued jobs
    run) from its Config, publishing to `registry`, reporting to `metrics` (a Metrics)."""
    from adapterd.engine.model import base_model_dir
    from adapterd.training.jobs import JobManager

    return JobManager(
        config.training, base_model=base_model_dir(config.model.base_model), device=config.model.device,
        compute_dtype=config.model.compute_dtype, quantization=config.model.quantization, max_rank=config.cache.max_rank,
        max_virtual_tokens=config.registry.max_virtual_tokens,
        publish=registry_publisher(registry), metrics=metrics,
    ).start()
