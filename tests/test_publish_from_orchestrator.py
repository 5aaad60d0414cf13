"""`storage.publish`: the orchestrator publishes its output while the run grows."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import caption_all, orchestrator_config

from caption_flow.config.models import PublishConfig, StorageConfig
from caption_flow.storage.state import StateDB

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("every", "seconds"), [(30, 30.0), ("10 minutes", 600.0), ("30 s", 30.0), ("1 hour", 3600.0)]
)
def test_every_takes_seconds_or_a_duration(every: object, seconds: float) -> None:
    assert PublishConfig(to="/x", every=every).every == seconds


def test_an_unknown_unit_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown unit"):
        PublishConfig(to="/x", every="3 fortnights")


async def test_the_orchestrator_publishes_every_recorded_part_and_the_tables(
    tmp_path: Path, tiny_model_dir: Path, image_folder
) -> None:
    images = image_folder(6)
    data = tmp_path / "data"
    target = tmp_path / "published"
    config = orchestrator_config(data, images[0].parent, tiny_model_dir, chunk_size=2)
    storage = StorageConfig(
        data_dir=data,
        compact_seconds=0.3,
        compact_rows=2,
        publish=PublishConfig(to=str(target), every=0.2),
    )
    await caption_all(config.model_copy(update={"storage": storage}))
    db = StateDB(data / "state.db")
    recorded = db.part_names()
    db.close()
    assert recorded, "the run wrote parts"
    published = {p.name for p in (target / "captions").glob("part-*.parquet")}
    assert published == recorded
    for name in recorded:  # byte for byte
        assert (target / "captions" / name).read_bytes() == (data / "captions" / name).read_bytes()
    assert (target / "contributors.parquet").is_file() and (target / "jobs.parquet").is_file()
