"""Prepared images: what a GPU worker without the dataset receives instead of the original.

A dataworker (or the orchestrator, when none is connected) decodes an item, applies its EXIF
orientation, shrinks it to the job's ``image`` size and re-encodes it compactly, so the
bytes crossing the network are what the engine will use, not a 20-megapixel original. An
original that is already small, upright and JPEG/WebP goes as it is (no second lossy pass).

:func:`check_prepared` is the orchestrator's check on what a dataworker sends: it reads only
the header, so a hostile dataworker cannot make it decode anything.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

from caption_flow.config.models import ImageConfig
from caption_flow.errors import ImageError
from caption_flow.images.decode import (
    decode_image,
    error_reason,
    pillow_orientation,
    target_size,
)
from caption_flow.images.orientation import jpeg_exif_orientation

PreparedFormat = Literal["jpeg", "webp"]
PASS_THROUGH_FORMATS = {"JPEG", "WEBP"}
_PIL_FORMAT = {"jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class PrepareSettings:
    """How to prepare: the job's image section, the encoding and its quality."""

    image: ImageConfig
    format: PreparedFormat = "jpeg"
    quality: int = 90

    def to_wire(self) -> dict[str, Any]:
        return {
            **self.image.model_dump(mode="json"),
            "format": self.format,
            "quality": self.quality,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> PrepareSettings:
        """Settings from the orchestrator's prep_assign (validated like a config file)."""
        fields = dict(wire)
        fmt = fields.pop("format", "jpeg")
        quality = fields.pop("quality", 90)
        if fmt not in _PIL_FORMAT:
            raise ValueError(f"unknown prepared format {fmt!r}")
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"invalid quality {quality!r}")
        return cls(ImageConfig.model_validate(fields), fmt, quality)


@dataclass(frozen=True)
class PreparedImage:
    """Encoded bytes and the original's size as displayed (after EXIF orientation)."""

    data: bytes
    width: int
    height: int


def prepare_image(data: bytes, settings: PrepareSettings) -> PreparedImage:
    """Shrink and re-encode one image; raises ImageError for anything undecodable."""
    passed = _pass_through(data, settings.image)
    if passed is not None:
        return passed
    image, width, height = decode_image(data, settings.image)
    out = io.BytesIO()
    options: dict[str, Any] = {"quality": settings.quality}
    if settings.format == "jpeg":
        options["optimize"] = False  # a second pass over the data for ~2 %: not worth the CPU
    else:
        options["method"] = 2  # WebP effort: faster than the default 4, nearly as small
    try:
        image.save(out, _PIL_FORMAT[settings.format], **options)
    except Exception as exc:  # an encoder refusing an odd size or mode: one bad item
        raise ImageError(f"cannot encode prepared image: {error_reason(exc)}") from None
    return PreparedImage(out.getvalue(), width, height)


def _pass_through(data: bytes, config: ImageConfig) -> PreparedImage | None:
    """The original itself when decoding and re-encoding would change nothing useful."""
    try:
        opened = Image.open(io.BytesIO(data))
        fmt, mode, (width, height) = opened.format, opened.mode, opened.size
    except Exception:
        return None  # the decoder gives the real error
    if fmt not in PASS_THROUGH_FORMATS or mode not in ("RGB", "L"):
        return None
    if width * height > config.pixel_limit or target_size(width, height, config) != (
        width,
        height,
    ):
        return None
    if fmt == "JPEG" and jpeg_exif_orientation(data) != 1:
        return None
    if fmt == "WEBP" and pillow_orientation(opened) != 1:
        return None
    return PreparedImage(data, width, height)


def check_prepared(data: bytes, config: ImageConfig) -> str | None:
    """Why bytes sent as a prepared image are refused (None: accepted). Header only: a JPEG
    or WebP no larger than the job's target size."""
    try:
        opened = Image.open(io.BytesIO(data))
        fmt, (width, height) = opened.format, opened.size
    except Exception as exc:
        return f"not an image: {error_reason(exc)}"
    if fmt not in PASS_THROUGH_FORMATS:
        return f"prepared images are JPEG or WebP, not {fmt}"
    if width <= 0 or height <= 0 or width * height > config.pixel_limit:
        return f"invalid size {width}x{height}"
    allowed_w, allowed_h = target_size(width, height, config)
    # Rounding may differ by a pixel between two correct implementations.
    if width > allowed_w + 1 or height > allowed_h + 1:
        return f"{width}x{height} is larger than the job's image size allows"
    return None
