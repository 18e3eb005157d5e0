"""Training: a dataset in, a served adapter out.

    spec.py      what a job asks for, with the hosted-API defaults
    data.py      the JSONL formats, checked line by line; completion-only labels
    jobs.py      the SQLite job and event store, the queue, one worker process per job
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
