"""EXIF orientation without Pillow: the fast JPEG path decodes with simplejpeg, which ignores
EXIF, so the orientation tag is read here from the APP1 segment (a few hundred bytes).

Phones store most photos sideways with an orientation tag; captioning a sideways photo
gives sideways captions ("a person lying down").
"""

from __future__ import annotations

import struct

from PIL import Image

TRANSPOSE_METHODS: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_ORIENTATION_TAG = 0x0112
_SOS = 0xDA
_EOI = 0xD9
_APP1 = 0xE1
# Markers without a length field: TEM and RST0-7.
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def swaps_axes(orientation: int) -> bool:
    """Orientations 5-8 rotate by 90 degrees: stored width is shown height."""
    return orientation in (5, 6, 7, 8)


def jpeg_exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG, 1 where absent or unreadable.

    Walks the marker segments before the image data; never raises on malformed input.
    """
    try:
        return _scan_segments(data)
    except (IndexError, struct.error, ValueError):
        return 1


def _scan_segments(data: bytes) -> int:
    pos = 2  # after SOI
    end = len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (_SOS, _EOI):
            return 1
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return 1
        if marker == _APP1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return _tiff_orientation(data[pos + 10 : pos + 2 + length])
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if tiff[:2] == b"II":
        order = "<"
    elif tiff[:2] == b"MM":
        order = ">"
    else:
        return 1
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for index in range(min(count, 512)):
        entry = ifd + 2 + 12 * index
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == _ORIENTATION_TAG:
            if kind == 3:  # SHORT, stored in the first two bytes of the value field
                (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
            elif kind == 4:  # LONG, written by a few tools
                (value,) = struct.unpack_from(order + "I", tiff, entry + 8)
            else:
                return 1
            return value if 1 <= value <= 8 else 1
    return 1
