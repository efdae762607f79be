"""Image files the tests write by hand, for what PIL cannot write: a decompression bomb."""

import struct
import zlib
from pathlib import Path

from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 20_000) -> bytes:
    """A PNG of a few dozen bytes whose header claims side x side 8-bit grey pixels: more than twice
    `PIL.Image.MAX_IMAGE_PIXELS` by default, so PIL refuses to open it (`DecompressionBombError`)."""
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def write_bomb_png(path: Path) -> Path:
    path.write_bytes(bomb_png())
    return path
