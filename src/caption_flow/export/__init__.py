"""Getting the captions out: committed rows, de-duplicated and streamed into a format.

One writer per format behind :class:`~caption_flow.export.base.Writer`; the reader
(:mod:`.reader`) reads only parts that ``state.db`` records, so exports are safe while the
orchestrator runs.
"""

from caption_flow.export.base import ExportResult, WriterOptions
from caption_flow.export.reader import CommittedOutput, Selection
from caption_flow.export.run import FORMATS, export, recorded_dataset
from caption_flow.export.stats import collect_stats

__all__ = [
    "FORMATS",
    "CommittedOutput",
    "ExportResult",
    "Selection",
    "WriterOptions",
    "collect_stats",
    "export",
    "recorded_dataset",
]
