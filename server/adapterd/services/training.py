"""The Training service: create, read, cancel and watch training jobs.

Thin: read the caller's tenant, call the JobManager (training/jobs.py), answer. CreateJob
receives the spec, then the dataset files in chunks, refusing a file over
--max-dataset-bytes as soon as it passes the limit, under the upload limits (uploads.py);
the whole dataset is then checked (in a thread: tokenizing a large file takes a while)
before the job is queued.
"""

from __future__ import annotations

import asyncio

from adapterd_api.v1 import training_pb2 as pb
from adapterd_api.v1 import training_pb2_grpc as pb_grpc

from adapterd.auth import TenantLimiter
from adapterd.errors import InvalidArgument
from adapterd.tenancy import current_principal
from adapterd.training import store
from adapterd.training.data import check_size
from adapterd.training.evaluate import retention
from adapterd.training.jobs import JobManager
from adapterd.training.spec import TrainingSpec
from adapterd.training.store import Event, Job
from adapterd.uploads import Uploads

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Training"].full_name

STATES = {s: pb.JobState.Value(s.upper()) for s in store.STATES}
_STATE_NAMES = {v: k for k, v in STATES.items()}
EVENT_TYPES = {
    "state": pb.STATE, "message": pb.MESSAGE, "started": pb.STARTED, "step": pb.STEP,
    "eval": pb.EVAL, "evaluation": pb.EVALUATION,
}
FILES = {pb.TRAINING: "training file", pb.VALIDATION: "validation file", pb.RETENTION: "retention file"}
# evaluate.py's score names -> Scores fields.
ROUGE_FIELDS = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rouge_l"}
# Hyperparameters' optional fields, each named as the TrainingSpec field it sets.
_OPTIONAL_FIELDS = (
    "epochs", "learning_rate", "rank", "alpha", "dropout", "batch_size", "grad_accum", "max_seq_len", "seed",
    "val_split", "warmup_ratio", "max_eval_examples", "eval_max_new_tokens", "replay_ratio", "min_retention", "virtual_tokens",
    "task_subspace", "shrink_to_gain",
)


class TrainingService(pb_grpc.TrainingServicer):
    def __init__(self, jobs: JobManager, limiter: TenantLimiter | None = None, uploads: Uploads | None = None):
        self.jobs = jobs
        self.limiter = limiter or TenantLimiter()
        self.uploads = uploads or Uploads()

    async def CreateJob(self, request_iterator, context) -> pb.Job:
        tenant = current_principal().tenant
        # Before the upload: a tenant at its max_training_jobs is told at once.
        self.limiter.check_training_jobs(tenant, self.jobs.active_jobs(tenant))
        with self.uploads.hold(tenant, "CreateJob"):
            messages = self.uploads.messages(request_iterator, "CreateJob")
            spec, files = await receive_job(messages, self.jobs.config.max_dataset_bytes)
        if "training file" not in files:
            raise InvalidArgument("CreateJob: no training file was sent (DatasetChunk.file = TRAINING)")
        job = await asyncio.to_thread(
            self.jobs.create, tenant, spec, files["training file"],
            files.get("validation file"), files.get("retention file"),
        )
        return job_message(job)

    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        return job_message(self.jobs.get(current_principal().tenant, request.job_id))

    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        unknown = [s for s in request.states if s not in _STATE_NAMES]
        if unknown:
            raise InvalidArgument(
                f"states: {unknown[0]} is not a job state; one of {', '.join(pb.JobState.keys()[1:])}"
            )
        states = [_STATE_NAMES[s] for s in request.states]
        jobs, token = self.jobs.list(
            current_principal().tenant, page_size=request.page_size, page_token=request.page_token, states=states
        )
        return pb.ListJobsResponse(jobs=[job_message(j) for j in jobs], next_page_token=token)

    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return job_message(self.jobs.cancel(current_principal().tenant, request.job_id))

    async def WatchJob(self, request: pb.WatchJobRequest, context):
        async for event in self.jobs.follow(current_principal().tenant, request.job_id, request.after_seq):
            yield event_message(event)


async def receive_job(messages, max_bytes: int) -> tuple[TrainingSpec, dict[str, bytes]]:
    """The spec (checked before any dataset byte), then each file's bytes, refusing a file as
    soon as it passes max_bytes."""
    first = await anext(aiter(messages), None)
    if first is None or first.WhichOneof("payload") != "spec":
        raise InvalidArgument("CreateJob: the first message must be the job spec")
    spec = training_spec(first.spec)
    buffers: dict[str, bytearray] = {}
    async for message in messages:
        if message.WhichOneof("payload") != "chunk":
            raise InvalidArgument("CreateJob: only the first message may be the spec; then dataset chunks")
        what = FILES.get(message.chunk.file)
        if what is None:
            raise InvalidArgument("CreateJob: DatasetChunk.file must be TRAINING, VALIDATION or RETENTION")
        buffer = buffers.setdefault(what, bytearray())
        buffer += message.chunk.data
        if len(buffer) > max_bytes:
            check_size(bytes(buffer), max_bytes, what)
    return spec, {what: bytes(b) for what, b in buffers.items()}


def training_spec(spec: pb.JobSpec) -> TrainingSpec:
    """The TrainingSpec of a JobSpec: unset hyperparameters take the defaults."""
    h = spec.hyperparameters
    kwargs = {f: getattr(h, f) for f in _OPTIONAL_FIELDS if h.HasField(f)}
    if h.target_modules:
        kwargs["target_modules"] = tuple(h.target_modules)
    for f in ("method", "replay_loss"):  # strings: "" is unset
        if getattr(h, f):
            kwargs[f] = getattr(h, f)
    return TrainingSpec(name=spec.name, description=spec.description, early_stopping=not h.no_early_stopping,
                        use_dora=h.use_dora, **kwargs)


def hyperparameters(spec: TrainingSpec) -> pb.Hyperparameters:
    h = pb.Hyperparameters(target_modules=list(spec.target_modules), no_early_stopping=not spec.early_stopping,
                           method=spec.method, use_dora=spec.use_dora, replay_loss=spec.replay_loss)
    for f in _OPTIONAL_FIELDS:
        setattr(h, f, getattr(spec, f))
    return h


def job_message(job: Job) -> pb.Job:
    msg = pb.Job(
        id=job.id, name=job.name, state=STATES[job.state], error=job.error,
        hyperparameters=hyperparameters(job.spec), description=job.spec.description,
        created_at=job.created_at, started_at=job.started_at or 0.0, finished_at=job.finished_at or 0.0,
        step=job.step, total_steps=job.total_steps,
        train_examples=job.train_examples, validation_examples=job.validation_examples,
        retention_examples=job.retention_examples, adapter=job.adapter,
        evaluation=evaluation_messages(job.evaluation),
    )
    if job.loss is not None:
        msg.loss = job.loss
    kept = retention(job.evaluation)
    if kept is not None:
        msg.retention = kept
    t = job.training
    if t:
        msg.training.CopyFrom(pb.TrainingStats(
            steps=t.get("steps", 0), stopped_early=t.get("stopped_early", False), train_loss=t.get("train_loss", 0.0),
            runtime_s=t.get("train_runtime_s", 0.0), tokens=int(t.get("tokens", 0)),
            tokens_per_second=t.get("tokens_per_second", 0.0), peak_memory_bytes=int(t.get("peak_memory_bytes", 0)),
            replay_examples=int(t.get("replay_examples", 0)), adapter_scale=t.get("adapter_scale", 1.0),
        ))
        if t.get("best_eval_loss") is not None:
            msg.training.best_eval_loss = t["best_eval_loss"]
    return msg


def evaluation_messages(evaluation: dict) -> list[pb.SplitEvaluation]:
    return [
        pb.SplitEvaluation(split=split, examples=r["examples"], adapter=_scores(r["adapter"]), base=_scores(r["base"]),
                           references=r.get("references", "file"))
        for split, r in evaluation.items()
    ]


def _scores(s: dict) -> pb.Scores:
    return pb.Scores(
        loss=s["loss"], perplexity=s["perplexity"],
        **{field: pb.Rouge(**s[key]) for key, field in ROUGE_FIELDS.items()},
        samples=[pb.Sample(**sample) for sample in s.get("samples", [])],
    )


def event_message(event: Event) -> pb.JobEvent:
    d = event.data
    msg = pb.JobEvent(job_id=event.job_id, seq=event.seq, time=event.time, type=EVENT_TYPES[event.type],
                      message=d.get("message", ""))
    if "state" in d:
        msg.state = STATES[d["state"]]
    for f in ("step", "total_steps", "epoch", "loss", "learning_rate", "eval_loss", "tokens_per_second", "elapsed_s"):
        if d.get(f) is not None:
            setattr(msg, f, d[f])
    if "evaluation" in d:
        msg.evaluation.extend(evaluation_messages(d["evaluation"]))
    return msg


def register(server, jobs: JobManager, limiter: TenantLimiter | None = None, uploads: Uploads | None = None) -> str:
    pb_grpc.add_TrainingServicer_to_server(TrainingService(jobs, limiter, uploads), server)
    return SERVICE_NAME
