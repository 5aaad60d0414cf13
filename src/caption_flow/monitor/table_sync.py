"""Keep a DataTable in step with keyed rows without clearing it, so that a refresh every
second keeps the reader's cursor and scroll position."""

from __future__ import annotations

from textual.widgets import DataTable


def sync_rows(table: DataTable[str], rows: dict[str, list[str]]) -> None:
    """Make ``table`` show ``rows`` (key -> cells, in the table's column order)."""
    present = {key.value for key in table.rows if key.value is not None}
    for key in present - rows.keys():
        table.remove_row(key)
    columns = list(table.columns)
    for key, cells in rows.items():
        if key in present:
            for column, value in zip(columns, cells, strict=False):
                if table.get_cell(key, column) != value:
                    table.update_cell(key, column, value)
        else:
            table.add_row(*cells, key=key)
