"""Cheap JPEG checks before bytes reach DALI.

A truncated or non-JPEG payload makes a DALI pipeline invalid for every sample
that follows ("pipeline no longer valid"), so each payload is checked here first:
the SOI marker, a frame header with the image size, and the EOI marker at the end.
"""

from __future__ import annotations

from typing import NamedTuple

# Start-of-frame markers carry the image size (C4 DHT, C8 JPG, CC DAC are not frames).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class JpegInfo(NamedTuple):
    height: int
    width: int
    channels: int


class JpegError(ValueError):
    """The payload is not a complete JPEG. The message says why."""


def jpeg_info(data: bytes | memoryview) -> JpegInfo:
    """Return the frame size of a JPEG, or raise :class:`JpegError` saying what is wrong."""
    buf = memoryview(data)
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise JpegError("not a JPEG (no SOI marker)")
    tail = bytes(buf[max(0, n - 64):]).rstrip(b"\x00\r\n ")
    if not tail.endswith(b"\xff\xd9"):
        raise JpegError("truncated JPEG (no EOI marker at the end)")
    pos = 2
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            raise JpegError(f"corrupt JPEG (expected a marker at byte {pos})")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        if marker in _SOF:
            if pos + 10 > n:
                break
            height = (buf[pos + 5] << 8) | buf[pos + 6]
            width = (buf[pos + 7] << 8) | buf[pos + 8]
            channels = buf[pos + 9]
            if height == 0 or width == 0:
                raise JpegError(f"JPEG frame has zero size ({width}x{height})")
            return JpegInfo(height, width, channels)
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise JpegError("corrupt JPEG (no frame header before the scan data)")
