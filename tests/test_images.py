"""The worker's image path: decoders, orientation, colour modes, bombs, the decode pool."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from caption_flow.config.models import ImageConfig
from caption_flow.errors import ImageError
from caption_flow.images import DecodePool, decode_image, fast_decoder_available, target_size
from caption_flow.images.orientation import jpeg_exif_orientation

DECODERS = ["auto", "pillow"]


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: shows where a rotation put the left edge."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 2] = (255, 0, 0)
    array[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(array)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png16_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: a decompression bomb."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real small JPEG with its frame header patched to claim ``width`` x ``height``."""
    data = bytearray(encode(Image.new("RGB", (16, 16), "gray")))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def mean_rgb(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box)).reshape(-1, 3).mean(axis=0)


@pytest.mark.parametrize("decoder", DECODERS)
def test_jpeg_is_shrunk_keeping_aspect(decoder: str) -> None:
    config = ImageConfig(max_side=256, decoder=decoder)
    image, width, height = decode_image(encode(halves(2048, 1024)), config)
    assert (width, height) == (2048, 1024)
    assert image.mode == "RGB" and image.size == (256, 128)
    assert mean_rgb(image, (0, 0, 100, 128))[0] > 200  # red stays left
    assert mean_rgb(image, (156, 0, 256, 128))[2] > 200


def test_fast_and_pillow_decoders_agree() -> None:
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8), np.ones((32, 32, 1)))
    data = encode(Image.fromarray(smooth.astype(np.uint8)), quality=95)
    fast, *_ = decode_image(data, ImageConfig(max_side=300))
    slow, *_ = decode_image(data, ImageConfig(max_side=300, decoder="pillow"))
    assert fast.size == slow.size == (300, 225)
    diff = np.abs(np.asarray(fast, np.int16) - np.asarray(slow, np.int16))
    assert diff.mean() < 4


def test_never_enlarges_and_max_pixels() -> None:
    assert target_size(100, 50, ImageConfig(max_side=1024)) == (100, 50)
    assert target_size(4000, 1000, ImageConfig(max_side=2000, max_pixels=400 * 100)) == (400, 100)
    image, *_ = decode_image(encode(halves(1600, 800)), ImageConfig(max_pixels=200 * 100))
    assert image.size == (200, 100)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("max_side", [1024, 100])
def test_exif_orientation_is_applied(decoder: str, max_side: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    data = encode(halves(400, 200), exif=exif.tobytes())
    assert jpeg_exif_orientation(data) == 6
    image, width, height = decode_image(data, ImageConfig(max_side=max_side, decoder=decoder))
    assert (width, height) == (200, 400)
    expected = (200, 400) if max_side >= 400 else (50, 100)
    assert image.size == expected
    w, h = image.size
    assert mean_rgb(image, (0, 0, w, h // 3))[0] > 200  # stored left edge is now on top
    assert mean_rgb(image, (0, 2 * h // 3, w, h))[2] > 200


def test_orientation_parser_reads_big_endian_and_survives_garbage() -> None:
    tiff = b"MM\x00\x2a\x00\x00\x00\x08" + struct.pack(">HHHIHH", 1, 0x0112, 3, 1, 8, 0)
    app1 = b"Exif\x00\x00" + tiff
    data = b"\xff\xd8\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + b"\xff\xda"
    assert jpeg_exif_orientation(data) == 8
    assert jpeg_exif_orientation(b"\xff\xd8\xff\xe1\x00\x40Exif\x00\x00MM\x00") == 1
    assert jpeg_exif_orientation(b"\xff\xd8") == 1


@pytest.mark.parametrize("decoder", DECODERS)
def test_cmyk_jpeg_becomes_rgb(decoder: str) -> None:
    data = encode(Image.new("RGB", (64, 48), (255, 0, 0)).convert("CMYK"))
    image, *_ = decode_image(data, ImageConfig(decoder=decoder))
    assert image.mode == "RGB" and image.size == (64, 48)
    red, green, blue = mean_rgb(image, (0, 0, 64, 48))
    assert red > 200 and green < 60 and blue < 60


def test_grayscale_jpeg_and_png_become_rgb() -> None:
    gray = Image.linear_gradient("L").resize((64, 64))
    for data in (encode(gray), encode(gray, "PNG")):
        image, *_ = decode_image(data, ImageConfig())
        assert image.mode == "RGB" and image.size == (64, 64)


def test_16_bit_grayscale_is_scaled_not_clipped() -> None:
    ramp = (np.arange(256, dtype=np.uint32).repeat(64).reshape(256, 64) * 257).astype(np.uint16)
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image, *_ = decode_image(data, ImageConfig())
    values = np.asarray(image)[:, 0, 0]
    assert values[0] < 5 and 120 < values[128] < 136 and values[-1] > 250


def test_16_bit_rgb_png() -> None:
    array = np.zeros((32, 48, 3), np.uint16)
    array[..., 1] = 65535
    array[..., 2] = 32768
    image, width, height = decode_image(png16_rgb(array), ImageConfig())
    assert image.mode == "RGB" and (width, height) == (48, 32)
    red, green, blue = mean_rgb(image, (0, 0, 48, 32))
    assert red < 5 and green > 250 and 120 < blue < 136


def test_palette_with_transparency_goes_over_white() -> None:
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (16, 0, 32, 32))
    data = encode(palette, "PNG", transparency=0)
    image, *_ = decode_image(data, ImageConfig())
    assert image.mode == "RGB"
    assert tuple(image.getpixel((2, 2))) == (255, 255, 255)  # transparent: white
    assert tuple(image.getpixel((30, 2))) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_goes_over_white(mode: str) -> None:
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (10, 0, 20, 10))
    data = encode(rgba.convert(mode), "PNG")
    image, *_ = decode_image(data, ImageConfig())
    assert tuple(image.getpixel((2, 5))) == (255, 255, 255)
    assert tuple(image.getpixel((15, 5))) == (0, 0, 0)


@pytest.mark.parametrize(
    "data",
    [png_claiming(40_000, 40_000), jpeg_claiming(60_000, 60_000)],
    ids=["png", "jpeg"],
)
def test_decompression_bomb_fails_the_item(data: bytes) -> None:
    for decoder in DECODERS:
        with pytest.raises(ImageError, match="decompression bomb"):
            decode_image(data, ImageConfig(decoder=decoder))


def test_pixel_limit_is_configurable() -> None:
    data = encode(halves(100, 100))
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(data, ImageConfig(pixel_limit=9_999))
    decode_image(data, ImageConfig(pixel_limit=10_000))


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage", b"\x89PNG\r\n\x1a\nbroken"],
)
def test_garbage_raises_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        decode_image(data, ImageConfig())


@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_jpeg_raises_image_error(decoder: str) -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)))
    with pytest.raises(ImageError):
        decode_image(data[: len(data) // 2], ImageConfig(decoder=decoder))


def test_animated_gif_and_webp_take_the_first_frame() -> None:
    frames = [Image.new("RGB", (30, 20), color) for color in ("red", "blue")]
    for fmt in ("GIF", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
        image, width, height = decode_image(data, ImageConfig())
        assert (width, height) == (30, 20) and image.mode == "RGB"
        assert mean_rgb(image, (0, 0, 30, 20))[0] > 200


@pytest.mark.skipif(not fast_decoder_available(), reason="simplejpeg (the fast extra) missing")
def test_plain_jpegs_take_the_fast_path_and_cmyk_does_not() -> None:
    from caption_flow.images.decode import _decode_jpeg_fast

    config = ImageConfig(max_side=64)
    assert _decode_jpeg_fast(encode(halves(256, 128)), config) is not None
    assert _decode_jpeg_fast(encode(halves(256, 128).convert("L")), config) is not None
    assert _decode_jpeg_fast(encode(halves(256, 128).convert("CMYK")), config) is None


def test_pool_keeps_order_and_reports_failures() -> None:
    good = encode(halves(640, 480))
    datas = [good, b"junk", None, good]
    with DecodePool(ImageConfig(max_side=64), threads=2) as pool:
        results = list(pool.imap(iter(datas), window=2))
    assert [r.error is None for r in results] == [True, False, False, True]
    assert results[0].image is not None and results[0].image.size == (64, 48)
    assert results[2].error == "no image data"


def test_pool_decodes_off_the_event_loop() -> None:
    good = encode(halves(320, 240))

    async def main() -> list[tuple[int, int] | None]:
        with DecodePool(ImageConfig(max_side=32), threads=2) as pool:
            one = await pool.decode(good)
            batch = await pool.decode_batch([good, b"x", good])
        return [r.image.size if r.image else None for r in [one, *batch]]

    assert asyncio.run(main()) == [(32, 24), (32, 24), None, (32, 24)]
