"""Validated configuration objects (pydantic). Unknown keys are errors, so typos surface.

The orchestrator's ``vllm`` section is the job that workers receive; its name follows the
original tool even though the transformers engine reads it too. The original tool's other
keys are translated before validation (:mod:`caption_flow.config.legacy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from caption_flow.config import legacy


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Strict):
    temperature: float = Field(0.7, ge=0.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1)
    repetition_penalty: float = Field(1.05, gt=0.0)
    skip_special_tokens: bool = True
    stop: list[str] = []
    seed: int | None = None
    ignore_eos: bool = Field(
        False,
        description="generate max_tokens tokens whatever the model says (benchmarks: fixed "
        "output lengths with random weights)",
    )


class ImageConfig(_Strict):
    """How workers shrink images before inference (aspect ratio is kept)."""

    max_side: int = Field(1024, ge=16)
    max_pixels: int = Field(0, ge=0, description="0: no pixel budget beyond max_side")
    pixel_limit: int = Field(
        178_956_970, ge=1, description="decoded images larger than this fail (decompression bombs)"
    )
    decoder: Literal["auto", "pillow"] = Field(
        "auto",
        description="auto: simplejpeg (libjpeg-turbo) for JPEGs where installed, else Pillow; "
        "pillow: Pillow only (its draft mode still shrinks JPEGs while decoding)",
    )


class StageConfig(_Strict):
    """One stage of a multi-stage workflow: its prompts fill ``output_field``."""

    name: str
    model: str | None = None
    prompts: list[str]
    output_field: str = "captions"
    requires: list[str] = []
    sampling: SamplingConfig | None = None
    retry_prompt: str | None = Field(
        None, description="this stage's prompt for the one semantic retry (else the job's)"
    )
    retry_sampling: SamplingConfig | None = Field(
        None, description="this stage's sampling for the semantic retry (else the job's)"
    )
    output_schema: dict[str, Any] | None = Field(
        None, description="this stage's JSON schema for its captions (else the job's)"
    )


class ModelConfig(_Strict):
    """The ``vllm`` section: model, prompts and sampling that workers receive."""

    model: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    revision: str | None = None
    batch_size: int = Field(8, ge=1)
    dtype: str = "auto"
    max_model_len: int = Field(16384, ge=64)
    gpu_memory_utilization: float = Field(0.92, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(1, ge=1)
    enforce_eager: bool = False
    limit_mm_per_prompt: dict[str, int] = {"image": 1}
    disable_mm_preprocessor_cache: bool = False
    mm_processor_kwargs: dict[str, Any] = {}
    trust_remote_code: bool = False
    sampling: SamplingConfig = SamplingConfig()
    inference_prompts: list[str] = ["describe this image in detail"]
    output_field: str = "captions"
    stages: list[StageConfig] = []
    image: ImageConfig = ImageConfig()
    retry_prompt: str | None = Field(
        None,
        description="prompt for one retry of an empty, refused or invalid caption; None: the "
        "retry reuses the item's own prompt",
    )
    retry_sampling: SamplingConfig | None = Field(
        None, description="sampling for that retry; None: the stage's own sampling"
    )
    output_schema: dict[str, Any] | None = Field(
        None,
        description="a JSON schema every caption must match: sent to openai endpoints as "
        "response_format and checked on the worker and the orchestrator",
    )
    json_repairs: list[Literal["invalid_escapes", "duplicate_array_items"]] = Field(
        [],
        description="repairs tried on a JSON caption before it is checked (output_schema): "
        "invalid_escapes doubles a backslash that starts no JSON escape; "
        "duplicate_array_items keeps the first of equal array elements",
    )
    refusal_markers: list[str] = Field(
        ["I'm sorry", "I cannot", "I can't", "I am unable", "I'm unable"],
        description="a caption that starts with one of these (case-insensitive) is a refusal",
    )

    @field_validator("inference_prompts")
    @classmethod
    def _at_least_one_prompt(cls, value: list[str]) -> list[str]:
        if not value or any(not p.strip() for p in value):
            raise ValueError("needs at least one non-empty prompt")
        return value


class DatasetConfig(_Strict):
    type: Literal["local_folder", "webdataset", "huggingface"] = "local_folder"
    path: str = "./images"
    name: str | None = None
    version: str | None = Field(
        None,
        description="a label for this version of the dataset, written with every caption: "
        "the output's dataset column reads NAME@VERSION",
    )
    split: str = "train"
    subset: str | None = None
    revision: str | None = None
    image_column: str = "image"
    url_column: str | None = None
    id_column: str | None = None
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
    columns: list[str] | None = Field(
        None,
        description="extra fields given to prompts: column names (huggingface) or sidecar "
        "extensions such as txt, json (webdataset); None: all text, number and json ones",
    )
    storage_options: dict[str, Any] = Field(
        {}, description="fsspec options for remote shards (s3 credentials, anon, endpoint)"
    )
    list_concurrency: int = Field(
        16, ge=1, description="remote shards indexed at once while the orchestrator lists"
    )
    read_ahead_bytes: int = Field(
        16 * 1024 * 1024,
        ge=64 * 1024,
        description="most bytes of a tar shard a worker reads in one request ahead of use",
    )
    url_timeout: float = Field(20.0, gt=0, description="seconds per attempt at an image URL")
    url_retries: int = Field(
        2, ge=0, description="retries after a timeout, 429 or 5xx; other 4xx fail at once"
    )
    url_concurrency: int = Field(16, ge=1, description="image URLs downloaded at once")
    url_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="larger downloads fail the item"
    )

    _legacy = model_validator(mode="before")(legacy.dataset_keys)

    @property
    def label(self) -> str:
        """What the output's ``dataset`` column holds: the name (else the path), with
        ``@version`` when a version is set."""
        base = self.name or self.path
        return f"{base}@{self.version}" if self.version else base


_EVERY_UNITS = {
    **dict.fromkeys(("s", "sec", "second"), 1),
    **dict.fromkeys(("m", "min", "minute"), 60),
    **dict.fromkeys(("h", "hour"), 3600),
}


class PublishConfig(_Strict):
    """Continuous publishing: each new part and the contributors/jobs tables go to ``to`` as
    they are written, on a thread of their own, retried with back-off on failure."""

    to: str = Field(description="huggingface, or an fsspec URL or path (s3://..., /mnt/...)")
    repo: str | None = Field(None, description="org/name of the hub dataset repo")
    every: float = Field(
        600.0, gt=0, description="seconds between rounds; also '10 minutes', '30 s', '1 h'"
    )
    storage_options: dict[str, Any] = Field({}, description="fsspec options for the target")

    @field_validator("every", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            number, _, unit = value.strip().partition(" ")
            unit = unit.strip().lower().rstrip("s") or "s"
            if unit not in _EVERY_UNITS:
                raise ValueError(f"unknown unit {unit!r} (seconds, minutes or hours)")
            return float(number) * _EVERY_UNITS[unit]
        return value


class StorageConfig(_Strict):
    data_dir: Path = Path("./caption_data")
    publish: PublishConfig | None = None
    compact_rows: int = Field(50_000, ge=1, description="journal rows that trigger a part file")
    compact_seconds: float = Field(10.0, gt=0, description="oldest journal row age that does")
    group_commit_ms: float = Field(
        0.0, ge=0, description="extra wait to group commits; 0: group what arrived meanwhile"
    )
    force_new_dataset: bool = Field(
        False,
        description="when data_dir belongs to another dataset, move its run (state.db, "
        "captions/) aside into data_dir/replaced/<time>/ and start a new one; never mixes, "
        "never deletes",
    )

    _legacy = model_validator(mode="before")(legacy.storage_keys)


class TokenEntry(_Strict):
    """A token and the contributor it names. ``token`` may be ``sha256:<hex>``."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[^/]+$")
    token: str


class AuthConfig(_Strict):
    worker_tokens: list[TokenEntry] = []
    monitor_tokens: list[TokenEntry] = []
    admin_tokens: list[TokenEntry] = []
    dataworker_tokens: list[TokenEntry] = []


class TLSConfig(_Strict):
    cert: Path | None = None
    key: Path | None = None


class LimitsConfig(_Strict):
    """What one connection, and all of them together, may cost the orchestrator."""

    messages_per_second: float = Field(
        200.0, gt=0, description="per connection; beyond it the server stops reading for a while"
    )
    message_burst: int = Field(400, ge=1, description="messages allowed at once above the rate")
    max_outstanding_results: int = Field(
        16, ge=1, description="results messages of one connection being stored at once"
    )
    max_inflight_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024 * 1024,
        description="results bytes being stored at once, all connections together",
    )
    hello_max_bytes: int = Field(
        64 * 1024, ge=1024, description="largest frame before a connection has authenticated"
    )
    max_pending_handshakes: int = Field(
        1000, ge=1, description="connections at once that have not sent a valid hello yet"
    )
    max_queue: int = Field(
        4, ge=1, description="frames buffered per connection before reading stops"
    )


class DashboardConfig(_Strict):
    """The web page and ``/api/snapshot`` on the orchestrator's port."""

    enabled: bool = Field(True, description="serve the dashboard at / and /api/snapshot")
    public: bool = Field(
        False,
        description="no token needed: a community's progress page, which then shows no "
        "tokens, no addresses and of each worker only its name and rate",
    )


class PrepareConfig(_Strict):
    """Items prepared for workers that cannot read the dataset: shrunk to the job's
    ``image`` size and re-encoded, by dataworkers or by the orchestrator itself."""

    format: Literal["jpeg", "webp"] = Field("jpeg", description="encoding of prepared images")
    quality: int = Field(90, ge=1, le=100, description="jpeg/webp quality of prepared images")
    on_orchestrator: bool = Field(
        True,
        description="the orchestrator shrinks and re-encodes what it reads for a worker "
        "itself; off: it sends the dataset's bytes as they are",
    )
    buffer_memory_mb: float = Field(
        256.0, gt=0, description="prepared items kept in memory before spilling to disk"
    )
    buffer_disk_mb: float = Field(
        4096.0, ge=0, description="prepared items spilled to data_dir/prepared/ at most"
    )
    max_item_mb: float = Field(
        16.0, gt=0, description="largest prepared item a dataworker may send"
    )
    ahead_chunks: int = Field(
        8, ge=0, description="chunks prepared ahead of those leased to workers"
    )
    wait_seconds: float = Field(
        30.0,
        ge=0,
        description="how long a worker's fetch waits for a dataworker preparing those items "
        "before the orchestrator reads them itself",
    )
    lease_seconds: float = Field(
        120.0, gt=0, description="a dataworker that sends nothing for this long loses its chunks"
    )


class OrchestratorConfig(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(8765, ge=0, le=65535)
    dataset: DatasetConfig = DatasetConfig()
    vllm: ModelConfig = ModelConfig()
    storage: StorageConfig = StorageConfig()
    chunk_size: int = Field(1000, ge=1)
    chunks_per_request: int = Field(2, ge=1)
    lease_seconds: float = Field(120.0, gt=0)
    max_chunk_attempts: int = Field(3, ge=1)
    stall_seconds: float = Field(
        600.0,
        gt=0,
        description="a worker's leases end when it sends no new result for this long "
        "(allow for its model to load)",
    )
    max_chunks_per_session: int = Field(4, ge=1, description="chunks one connection may hold")
    reconnect_seconds: float = Field(
        30.0,
        gt=0,
        description="how long a gone worker's chunks wait for it to reconnect (also after a "
        "restart) before they go back to the queue",
    )
    heartbeat_seconds: float = Field(10.0, gt=0, description="how often workers report")
    max_item_attempts: int = Field(
        3, ge=1, description="failed tries of one item, across workers, before its error is final"
    )
    max_attempts_per_contributor: int | None = Field(
        None,
        ge=1,
        description="failed leases of a chunk that one contributor can count towards "
        "max_chunk_attempts; default: all of them when there is one worker token, else 1 "
        "(so no single token can fail chunks)",
    )
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    limits: LimitsConfig = LimitsConfig()
    status_interval: float = Field(30.0, gt=0)
    auth: AuthConfig = AuthConfig()
    ssl: TLSConfig = TLSConfig()
    dashboard: DashboardConfig = DashboardConfig()
    prepare: PrepareConfig = PrepareConfig()

    _legacy = model_validator(mode="before")(legacy.orchestrator_keys)


class EndpointConfig(_Strict):
    """One OpenAI-compatible server the ``openai`` engine sends requests to."""

    name: str = Field(min_length=1, max_length=128)
    base_url: str | None = Field(None, description="e.g. http://host:8000/v1")
    base_url_env: str | None = Field(None, description="environment variable with the base_url")
    api_key_env: str | None = Field(
        None, description="environment variable with the API key (the key is never in a file)"
    )
    model: str = Field(min_length=1, description="the model name the server knows")
    initial_concurrency: int = Field(4, ge=1)
    max_concurrency: int = Field(64, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    timeout_seconds: float = Field(120.0, gt=0)
    max_retries: int = Field(3, ge=0, description="further attempts per request after a failure")
    extra_body: dict[str, Any] = Field({}, description="merged into every request body")

    @model_validator(mode="after")
    def _one_url(self) -> EndpointConfig:
        if (self.base_url is None) == (self.base_url_env is None):
            raise ValueError("give exactly one of base_url and base_url_env")
        if self.initial_concurrency > self.max_concurrency:
            raise ValueError("initial_concurrency is above max_concurrency")
        return self


class WorkerConfig(_Strict):
    server: str = "ws://localhost:8765"
    token: str = Field("", max_length=512)
    name: str = Field("worker", min_length=1, max_length=128)
    gpu_id: int | None = None
    batch_size: int | None = Field(None, ge=1)
    model: str | None = None
    precision: str | None = None
    engine: Literal["auto", "transformers", "vllm", "openai"] = "auto"
    endpoints: list[EndpointConfig] = Field(
        [], description="the servers the openai engine uses, all at once"
    )
    image_format: Literal["jpeg", "png", "webp"] = Field(
        "jpeg", description="how the openai engine encodes images for its data URLs"
    )
    image_quality: int = Field(90, ge=1, le=100, description="jpeg/webp quality")
    dataset_path: str | None = Field(
        None, description="where this worker sees the dataset, if not at the orchestrator's path"
    )
    read_dataset: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="read the dataset here, or get the items' bytes from the orchestrator "
        "over the connection (no); auto: yes when the dataset's path exists here or is a URL",
    )
    prefetch_chunks: int = Field(1, ge=0, description="chunks to hold beyond the current one")
    prefetch_items: int | None = Field(
        None,
        ge=0,
        description="instead of prefetch_chunks: ask for another chunk while the chunks held "
        "beyond the current one have fewer items than this (the original readahead_size)",
    )
    ready_items: int | None = Field(
        None,
        ge=1,
        description="decoded images kept waiting for the engine, in whole batches of at "
        "least one (the original inference_queue_size); None: two batches",
    )
    decode_threads: int = Field(0, ge=0, description="0: one per core")
    heartbeat_seconds: float = Field(10.0, gt=0)
    reconnect_max_seconds: float = Field(30.0, gt=0)
    verify_ssl: bool = True
    exit_when_done: bool = False
    allow_remote_code: bool = Field(
        False,
        description="let the orchestrator's job turn on trust_remote_code; off: this worker "
        "runs every job with trust_remote_code false, whatever an admin sets",
    )
    dataset_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="this worker's own fsspec options (credentials) for remote shards; the "
        "orchestrator never sends its own",
    )
    ack_log: Path | None = Field(
        None,
        description="append one JSON line per acknowledged item (item_id, key, outputs, "
        "error) to this file",
    )
    engine_backoff_seconds: float = Field(
        5.0,
        gt=0,
        description="first wait before asking for work again after the engine could not run "
        "(out of memory, lost CUDA context); doubles per failure, with jitter",
    )
    engine_backoff_max_seconds: float = Field(300.0, gt=0, description="the longest such wait")

    _legacy = model_validator(mode="before")(legacy.worker_keys)

    @model_validator(mode="after")
    def _endpoints_for_openai(self) -> WorkerConfig:
        if self.engine == "openai" and not self.endpoints:
            raise ValueError("engine openai needs at least one entry in endpoints")
        return self


class MonitorConfig(_Strict):
    """``caption-flow monitor``: where to connect and what to show."""

    server: str = "ws://localhost:8765"
    token: str = Field("", max_length=512)
    verify_ssl: bool = True
    refresh_rate: float = Field(1.0, gt=0, description="seconds between redraws")
    show_contributors: bool = Field(True, description="the contributors table (leaderboard)")
    show_quality_metrics: bool = Field(
        True, description="captioned and failed counts, failed and trust columns"
    )
    max_activity_items: int = Field(
        20, ge=0, description="recent activity rows shown (0 hides the panel)"
    )
    show_chunk_progress: bool = Field(True, description="chunks per state")
    show_worker_queues: bool = Field(True, description="each worker's queued chunks, unacked")
    show_throughput_graph: bool = Field(
        True, description="the throughput graph (the orchestrator keeps its last two hours)"
    )
    public: bool = Field(
        False,
        description="in orchestrator.yaml: serve the web dashboard without a token (same as "
        "orchestrator.dashboard.public)",
    )


class AdminConfig(_Strict):
    """``caption-flow admin``, ``status``, ``contributors``: an admin token kept in a file
    rather than in shell history; the server defaults to the monitor section's."""

    server: str | None = None
    token: str = Field("", max_length=512)


class OrchestratorFile(_Strict):
    orchestrator: OrchestratorConfig = OrchestratorConfig()
    monitor: MonitorConfig | None = Field(
        None, description="the monitor's settings, when they live in orchestrator.yaml"
    )
    admin: AdminConfig | None = Field(None, description="the admin commands' token")

    @model_validator(mode="after")
    def _public_dashboard(self) -> OrchestratorFile:
        """``monitor.public: true`` (the issue's spelling) opens the orchestrator's page."""
        if self.monitor is not None and self.monitor.public:
            self.orchestrator.dashboard.public = True
        return self


class MonitorFile(_Strict):
    monitor: MonitorConfig = MonitorConfig()
    admin: AdminConfig | None = Field(None, description="the admin commands' token")


class WorkerFile(_Strict):
    worker: WorkerConfig = WorkerConfig()


class DataWorkerConfig(_Strict):
    """``caption-flow dataworker``: a CPU client that prepares items for GPU workers that
    cannot read the dataset."""

    server: str = "ws://localhost:8765"
    token: str = Field("", max_length=512)
    name: str = Field("dataworker", min_length=1, max_length=128)
    dataset_path: str | None = Field(
        None, description="where this host sees the dataset, if not at the orchestrator's path"
    )
    dataset_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="this host's own fsspec options (credentials) for remote shards",
    )
    threads: int = Field(0, ge=0, description="images prepared at once; 0: one per core")
    chunks_ahead: int = Field(1, ge=1, le=8, description="chunks asked for at once")
    message_mb: float = Field(
        4.0, gt=0, description="prepared bytes per message to the orchestrator"
    )
    unacked_messages: int = Field(
        2, ge=1, description="messages sent before the orchestrator's answer is awaited"
    )
    heartbeat_seconds: float = Field(10.0, gt=0)
    reconnect_max_seconds: float = Field(30.0, gt=0)
    verify_ssl: bool = True
    exit_when_done: bool = False


class DataWorkerFile(_Strict):
    dataworker: DataWorkerConfig = DataWorkerConfig()
