"""Decode image bytes to an RGB PIL image no larger than the configured size.

Raises ImageError for anything undecodable, so the item fails with a reason and the worker
goes on. JPEGs (most of any web-scale dataset) take the fast path: simplejpeg (libjpeg-turbo)
decodes straight to a reduced size (its DCT scaling skips most of the work for large photos),
falling back to Pillow's ``draft`` mode, which does the same inside Pillow. Everything else,
and any JPEG the fast path declines (CMYK, corrupt), goes through Pillow.

Thread-safe: no global state (``warnings.catch_warnings`` is not, so decompression bombs are
caught by an explicit pixel check before any pixel is decoded).
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import numpy as np
from PIL import Image

from caption_flow.config.models import ImageConfig
from caption_flow.errors import ImageError
from caption_flow.images.orientation import (
    TRANSPOSE_METHODS,
    jpeg_exif_orientation,
    swaps_axes,
)

try:  # optional: the ``fast`` extra
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - depends on the environment
    _simplejpeg = None

logger = logging.getLogger(__name__)

_HIGH_DEPTH_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
# libjpeg colour spaces that libjpeg-turbo converts to RGB exactly; CMYK/YCCK go to Pillow,
# which knows about Adobe's inverted CMYK.
_FAST_JPEG_COLORSPACES = {"YCbCr", "Gray", "RGB"}


def fast_decoder_available() -> bool:
    """Whether simplejpeg is importable (install the ``fast`` extra for it)."""
    return _simplejpeg is not None


def target_size(width: int, height: int, config: ImageConfig) -> tuple[int, int]:
    """The size after shrinking to ``max_side`` and ``max_pixels``; never enlarges."""
    scale = min(1.0, config.max_side / max(width, height))
    if config.max_pixels:
        scale = min(scale, (config.max_pixels / (width * height)) ** 0.5)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes, config: ImageConfig) -> tuple[Image.Image, int, int]:
    """Return (rgb_image, original_width, original_height).

    The original size is as displayed, i.e. after the EXIF orientation is applied, so that
    it has the aspect ratio of the returned image.
    """
    if not data:
        raise ImageError("empty file")
    if config.decoder != "pillow" and _simplejpeg is not None and data[:2] == b"\xff\xd8":
        fast = _decode_jpeg_fast(data, config)
        if fast is not None:
            return fast
    return _decode_pillow(data, config)


def _check_pixels(width: int, height: int, config: ImageConfig) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"invalid image size {width}x{height}")
    if width * height > config.pixel_limit:
        raise ImageError(
            f"decompression bomb: {width}x{height} exceeds the pixel limit of {config.pixel_limit}"
        )


def _decode_jpeg_fast(data: bytes, config: ImageConfig) -> tuple[Image.Image, int, int] | None:
    """simplejpeg with decode-time downscaling; None hands the image to Pillow instead."""
    assert _simplejpeg is not None
    try:
        height, width, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # Pillow gives the better error message, or copes
    _check_pixels(width, height, config)
    if colorspace not in _FAST_JPEG_COLORSPACES:
        return None
    orientation = jpeg_exif_orientation(data)
    swapped = swaps_axes(orientation)
    shown_w, shown_h = (height, width) if swapped else (width, height)
    out_w, out_h = target_size(shown_w, shown_h, config)
    stored_w, stored_h = (out_h, out_w) if swapped else (out_w, out_h)
    try:
        array = _simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=stored_w, min_height=stored_h, strict=True
        )
    except ValueError as exc:
        # Truncated or slightly damaged: libjpeg's strict mode refuses; Pillow may still cope,
        # and otherwise its error is the one reported.
        logger.debug("fast JPEG decode declined (%s); trying Pillow", exc)
        return None
    image = Image.fromarray(array, "RGB")
    image = _resize(image, (stored_w, stored_h))
    method = TRANSPOSE_METHODS.get(orientation)
    if method is not None:
        image = image.transpose(method)
    return image, shown_w, shown_h


def _decode_pillow(data: bytes, config: ImageConfig) -> tuple[Image.Image, int, int]:
    try:
        opened = Image.open(io.BytesIO(data))
        width, height = opened.size
        _check_pixels(width, height, config)
        orientation = pillow_orientation(opened)
        swapped = swaps_axes(orientation)
        shown_w, shown_h = (height, width) if swapped else (width, height)
        out_w, out_h = target_size(shown_w, shown_h, config)
        stored = (out_h, out_w) if swapped else (out_w, out_h)
        if opened.format == "JPEG":
            opened.draft(None, stored)  # DCT scaling: decodes at >= the target size
        opened.load()
        image = _to_rgb(opened)
        image = _resize(image, stored)
        method = TRANSPOSE_METHODS.get(orientation)
        if method is not None:
            image = image.transpose(method)
        return image, shown_w, shown_h
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except Exception as exc:
        # Pillow's format plugins raise many exception types on hostile input (OSError,
        # SyntaxError, struct.error, IndexError, ...); each is one bad item, never a crash.
        raise ImageError(f"cannot decode image: {error_reason(exc)}") from None


_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def error_reason(exc: BaseException) -> str:
    """``Type: message`` without object reprs (``<_io.BytesIO object at 0x7f...>``): a reason
    is stored and compared across items, and a memory address differs every time."""
    message = _OBJECT_REPR.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def pillow_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), 1 where absent or unreadable."""
    try:
        value: Any = image.getexif().get(0x0112, 1)
        orientation = int(value)
    except (OSError, ValueError, TypeError, SyntaxError):
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: alpha over white, 16-bit and float scaled rather than clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_gray(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in ("L", "1") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_depth_to_gray(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit and float grayscale to 8 bits. Pillow's own ``convert`` clips at 255,
    which turns a 16-bit image white."""
    array = np.asarray(image)
    if array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        low = float(finite.min()) if finite.size else 0.0
        high = float(finite.max()) if finite.size else 1.0
        if low >= 0.0 and high <= 1.0:
            low, high = 0.0, 1.0
        scaled = (np.nan_to_num(array, nan=low) - low) / max(high - low, 1e-12) * 255.0
    else:
        high = int(array.max()) if array.size else 0
        if high <= 255:
            scaled = array
        elif high <= 65535:
            scaled = array / 257.0
        else:
            scaled = array / (high / 255.0)
    return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L")


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.size == size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
