"""The web dashboard's static files: one page, its script and its style sheet.

No build step and nothing fetched from elsewhere: the files ship as package data and the
orchestrator serves them (:mod:`caption_flow.orchestrator.web`).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

# name -> content type; nothing outside this table is ever served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one of :data:`ASSETS` (read once). KeyError for any other name."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__name__).joinpath(name).read_bytes()
