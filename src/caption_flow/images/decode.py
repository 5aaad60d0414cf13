"""Decode image bytes to an RGB PIL image no larger than the configured size.

Raises ImageError for anything undecodable so the item fails with a reason and the worker
goes on.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

from caption_flow.config.models import ImageConfig
from caption_flow.errors import ImageError


def target_size(width: int, height: int, config: ImageConfig) -> tuple[int, int]:
    """The size after shrinking to ``max_side`` and ``max_pixels``; never enlarges."""
    scale = min(1.0, config.max_side / max(width, height))
    if config.max_pixels:
        scale = min(scale, (config.max_pixels / (width * height)) ** 0.5)
    return max(1, round(width * scale)), max(1, round(height * scale))


def decode_image(data: bytes, config: ImageConfig) -> tuple[Image.Image, int, int]:
    """Return (rgb_image, original_width, original_height)."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > config.pixel_limit:
                raise ImageError(f"image of {width}x{height} exceeds the pixel limit")
            size = target_size(width, height, config)
            if image.format == "JPEG":
                image.draft("RGB", size)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode != "RGB":
                if image.mode in ("RGBA", "LA") or "transparency" in image.info:
                    image = image.convert("RGBA")
                    background = Image.new("RGB", image.size, (255, 255, 255))
                    background.paste(image, mask=image.getchannel("A"))
                    image = background
                else:
                    image = image.convert("RGB")
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
            return image, width, height
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"cannot decode image: {exc}") from None
