"""Figures about a run's output: counts, caption lengths per field and prompt, failures,
contributors. Read from ``state.db`` (read-only) and the committed parts, never the journal."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from caption_flow.errors import StorageError
from caption_flow.export.reader import CommittedOutput, quote_name
from caption_flow.storage.identity import DB_NAME

TOP_REASONS = 10


def _db_counts(data_dir: Path) -> dict[str, int]:
    db_path = data_dir / DB_NAME
    try:
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            total, done = conn.execute(
                "SELECT count(*), COALESCE(sum(done), 0) FROM items"
            ).fetchone()
            journal = conn.execute("SELECT COALESCE(sum(items), 0) FROM journal").fetchone()[0]
            chunks_failed = conn.execute(
                "SELECT count(*) FROM chunks WHERE status='failed'"
            ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {db_path}: {exc}") from exc
    return {
        "items_total": int(total),
        "items_done": int(done),
        "items_in_journal": int(journal),
        "chunks_failed": int(chunks_failed),
    }


def collect_stats(data_dir: Path) -> dict[str, Any]:
    """Everything ``caption-flow stats`` shows, as plain data (what ``--json`` prints).

    Lengths are in characters, over the non-empty entries of successful rows; ``empty``
    counts the entries that hold no text."""
    stats: dict[str, Any] = dict(_db_counts(data_dir))
    with CommittedOutput(data_dir) as output:
        stats["parts"] = len(output.files)
        contributors = [
            {"contributor": c, "rows": int(n), "failed": int(f)}  # type: ignore[call-overload]
            for c, n, f in output.query(
                "SELECT contributor_id, count(*) AS n, count(error) FROM latest "
                "GROUP BY contributor_id ORDER BY n DESC, contributor_id"
            )
        ]
        # Every row has one contributor group (NULL is a group too), so they add up.
        stats["rows"] = sum(c["rows"] for c in contributors)
        stats["rows_failed"] = sum(c["failed"] for c in contributors)
        stats["captions"] = {}
        for field in output.fields:
            col = quote_name(field)
            lengths = output.query(
                f"SELECT p, count(*) FILTER (WHERE n > 0), count(*) FILTER (WHERE n = 0), "
                "min(n) FILTER (WHERE n > 0), median(n) FILTER (WHERE n > 0), "
                "quantile_cont(n, 0.9) FILTER (WHERE n > 0), max(n) "
                f"FROM (SELECT generate_subscripts({col}, 1) AS p, "
                f"length(trim(unnest({col}))) AS n FROM latest WHERE error IS NULL) "
                "GROUP BY p ORDER BY p"
            )
            stats["captions"][field] = [
                {
                    "prompt": int(p),  # type: ignore[call-overload]
                    "texts": int(n),  # type: ignore[call-overload]
                    "empty": int(e),  # type: ignore[call-overload]
                    "min": lo,
                    "median": med,
                    "p90": p90,
                    "max": hi,
                }
                for p, n, e, lo, med, p90, hi in lengths
            ]
        stats["failures"] = [
            {"reason": reason, "count": int(n)}  # type: ignore[call-overload]
            for reason, n in output.query(
                "SELECT error, count(*) AS n FROM latest WHERE error IS NOT NULL "
                f"GROUP BY error ORDER BY n DESC, error LIMIT {TOP_REASONS}"
            )
        ]
        stats["contributors"] = contributors
    return stats
