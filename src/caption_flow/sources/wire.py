"""A source item as the wire carries it to a worker that cannot read the dataset: plain column
values, every field within the protocol's bounds, the image prepared (shrunk and re-encoded)
when settings are given. The orchestrator and dataworkers make items the same way."""

from __future__ import annotations

from caption_flow.errors import ImageError
from caption_flow.images.prepare import PrepareSettings, prepare_image
from caption_flow.protocol.messages import (
    MAX_COLUMN_CHARS,
    MAX_ITEM_BYTES,
    MAX_REASON_CHARS,
    MAX_STATS,
    ItemData,
)
from caption_flow.sources.base import SourceItem


def item_data(item: SourceItem) -> ItemData:
    """``item`` within the wire's bounds: at most MAX_STATS plain columns, long texts cut,
    an error reason cut, bytes over MAX_ITEM_BYTES sent as an error instead."""
    columns: dict[str, str | int | float | bool] = {}
    for name, value in list(item.columns.items())[:MAX_STATS]:
        if not isinstance(value, (str, int, float, bool)):
            value = str(value)
        if isinstance(value, str):
            value = value[:MAX_COLUMN_CHARS]
        columns[str(name)[:64]] = value
    data = item.data
    error = item.error
    if data is not None and len(data) > MAX_ITEM_BYTES:
        error = f"item of {len(data)} bytes is too large to send"
    return ItemData(
        key=item.key,
        data=data if error is None else None,
        error=error[:MAX_REASON_CHARS] if error is not None else None,
        columns=columns,
        width=item.width,
        height=item.height,
    )


def prepared_data(item: SourceItem, settings: PrepareSettings | None) -> ItemData:
    """The item with its image prepared when ``settings`` are given (None: its bytes as they
    are); an image that does not decode goes out as the item's error."""
    if settings is None or item.error is not None or item.data is None:
        return item_data(item)
    try:
        prepared = prepare_image(item.data, settings)
    except ImageError as exc:
        return item_data(SourceItem(item.key, None, item.columns, str(exc)))
    return item_data(
        SourceItem(item.key, prepared.data, item.columns, None, prepared.width, prepared.height)
    )
