"""Push the export to a Hugging Face dataset repo: parquet shards plus a dataset card.

Resumable by construction: a shard's name carries a hash of its content
(``data/captions-00000-<sha>.parquet``), so a shard whose name is already in the repo holds
the same bytes and is not sent again. The local export is written first and kept (in
``staging``); if an upload fails, running the same command again pushes only what is missing.
One commit per shard, then one that writes the card and removes shards of earlier exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caption_flow.config.models import OrchestratorConfig
from caption_flow.errors import CaptionFlowError, ConfigError
from caption_flow.export.base import WriterOptions
from caption_flow.export.reader import Selection, recorded_parts
from caption_flow.export.run import Progress, export
from caption_flow.export.stats import collect_stats

log = logging.getLogger(__name__)

DATA_DIR_IN_REPO = "data"
MANIFEST = "manifest.json"


class PushError(CaptionFlowError):
    """An upload failed; the local export is intact and the message says how to resume."""


@dataclass
class PushResult:
    staging: Path
    rows: int = 0
    uploaded: list[str] = field(default_factory=list)
    already_there: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def hub_token() -> str | None:
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGINGFACE_HUB_TOKEN")


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:12]


def stage(
    data_dir: Path,
    staging: Path,
    selection: Selection,
    rows_per_file: int,
    progress: Progress | None = None,
) -> tuple[list[Path], int]:
    """Export to ``staging`` as content-named shards, recorded in a manifest; a staging
    folder whose manifest matches (same recorded parts, same selection) is reused as it is:
    that is a resumed push. New parts since make a new export."""
    manifest = staging / MANIFEST
    source = {
        "parts": [p.name for p in recorded_parts(data_dir)],
        "selection": repr(selection),
        "rows_per_file": rows_per_file,
    }
    if manifest.is_file():
        saved = json.loads(manifest.read_text())
        files = [staging / n for n in saved["files"]]
        if saved.get("source") == source and all(f.is_file() for f in files):
            log.info("resuming the push of the export in %s", staging)
            return files, int(saved["rows"])
    options = WriterOptions(output=staging, rows_per_file=rows_per_file, overwrite=True)
    result = export(data_dir, "parquet", selection, options, progress)
    named: list[Path] = []
    for path in result.files:
        target = path.with_name(f"{path.stem}-{_digest(path)}.parquet")
        path.replace(target)
        named.append(target)
    saved = {"files": [p.name for p in named], "rows": result.rows, "source": source}
    manifest.write_text(json.dumps(saved))
    return named, result.rows


def dataset_card(
    repo: str,
    stats: dict[str, Any],
    config: OrchestratorConfig | None,
    license_id: str | None,
    rows: int,
) -> str:
    """README.md: YAML header the hub reads (licence, data files), then the provenance."""
    header = ["---", f"license: {license_id or 'other'}", "configs:", "- config_name: default"]
    header += [
        "  data_files:",
        "  - split: train",
        f"    path: {DATA_DIR_IN_REPO}/*.parquet",
        "---",
    ]
    lines = [f"# {repo}", "", "Captions made with captionflow.", "", "## Provenance", ""]
    if config is not None:
        ds = config.dataset
        job = config.vllm
        lines += [
            f"- dataset: {ds.type} `{ds.path}`"
            + (f", revision `{ds.revision}`" if ds.revision else ""),
            f"- model: `{job.model}`" + (f", revision `{job.revision}`" if job.revision else ""),
            f"- sampling: `{json.dumps(job.sampling.model_dump(), sort_keys=True)}`",
            "- prompts (captions[i] answers prompt i):",
            *(f"  {i}. {p}" for i, p in enumerate(job.inference_prompts, 1)),
        ]
    lines += [
        f"- items: {stats['items_total']:,} listed, {stats['items_done']:,} done, "
        f"{stats['rows'] - stats['rows_failed']:,} captioned, {stats['rows_failed']:,} failed",
        f"- rows in this dataset: {rows:,}",
        "",
        "## Contributors",
        "",
        "| contributor | items | failed |",
        "|---|---:|---:|",
        *(
            f"| {c['contributor']} | {c['rows']:,} | {c['failed']:,} |"
            for c in stats["contributors"]
        ),
    ]
    return "\n".join([*header, "", *lines]) + "\n"


def push(
    data_dir: Path,
    repo: str,
    staging: Path,
    selection: Selection,
    *,
    private: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    config: OrchestratorConfig | None = None,
    license_id: str | None = None,
    rows_per_file: int = 100_000,
    progress: Progress | None = None,
    on_upload: Callable[[str], None] | None = None,
) -> PushResult:
    """Export, then upload what the repo does not hold yet, then the card."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if "/" not in repo:
        raise ConfigError(f"--repo {repo!r}: give it as org/name")
    files, rows = stage(data_dir, staging, selection, rows_per_file, progress)
    result = PushResult(staging=staging, rows=rows)
    api = HfApi(endpoint=endpoint, token=token or hub_token())
    resume = f"the export in {staging} is intact: run the same command again to push the rest"
    try:
        api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
        remote = set(api.list_repo_files(repo, repo_type="dataset"))
        for path in files:
            name = f"{DATA_DIR_IN_REPO}/{path.name}"
            if name in remote:
                result.already_there.append(name)
                continue
            api.create_commit(
                repo,
                [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))],
                commit_message=f"captionflow: add {name}",
                repo_type="dataset",
            )
            result.uploaded.append(name)
            if on_upload is not None:
                on_upload(name)
        wanted = {f"{DATA_DIR_IN_REPO}/{p.name}" for p in files}
        stale = sorted(
            n for n in remote if n.startswith(f"{DATA_DIR_IN_REPO}/") and n not in wanted
        )
        card = dataset_card(repo, collect_stats(data_dir), config, license_id, rows)
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))
        ]
        operations += [CommitOperationDelete(path_in_repo=n) for n in stale]
        api.create_commit(
            repo, operations, commit_message="captionflow: dataset card", repo_type="dataset"
        )
        result.removed = stale
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise PushError(f"push to {repo} failed ({' '.join(str(exc).split())}); {resume}") from exc
    return result
