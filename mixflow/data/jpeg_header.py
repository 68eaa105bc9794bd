"""Cheap JPEG checks before bytes reach DALI.

A truncated or non-JPEG payload makes a DALI pipeline invalid for every sample
that follows ("pipeline no longer valid"), so each payload is checked here first:
the SOI marker, a frame header with the image size, the EOI marker at the end, and
that each scan's data ends in a real marker (:func:`check_scan_markers`). What is inside the
scan data is walked by :mod:`mixflow.data.jpeg_entropy`.
The EXIF Orientation tag (APP1) is read on the way: DALI decodes an image the way
its orientation says to show it (as PIL's ``ImageOps.exif_transpose`` does), and a
crop window must be drawn in that oriented frame (orientations 5-8 swap width and
height).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Start-of-frame markers carry the image size (C4 DHT, C8 JPG, CC DAC are not frames).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}
# Other formats a mislabelled payload often is: named in the error.
_OTHER_FORMATS = ((b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"GIF8", "a GIF image"), (b"BM", "a BMP image"),
                  (b"RIFF", "a RIFF (WebP?) file"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"))


class JpegInfo(NamedTuple):
    height: int
    width: int
    channels: int


class JpegHeader(NamedTuple):
    """The stored frame size, the channels and the EXIF orientation (1..8; 1 when absent or unreadable)."""

    height: int
    width: int
    channels: int
    orientation: int = 1

    @property
    def oriented_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image as displayed (and decoded by DALI): swapped for 5..8."""
        return (self.width, self.height) if self.orientation >= 5 else (self.height, self.width)


class JpegError(ValueError):
    """The payload is not a complete JPEG. The message says why."""


def jpeg_info(data: bytes | memoryview) -> JpegInfo:
    """Return the (stored) frame size of a JPEG, or raise :class:`JpegError` saying what is wrong."""
    height, width, channels, _ = jpeg_header(data)
    return JpegInfo(height, width, channels)


def exif_orientation(app1: bytes | memoryview) -> int:
    """The Orientation tag (0x0112) of an APP1 payload (after the length), 1 when absent or malformed."""
    seg = bytes(app1)
    if not seg.startswith(b"Exif\x00\x00") or len(seg) < 14:
        return 1
    tiff = seg[6:]
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None:
        return 1
    u16 = lambda at: int.from_bytes(tiff[at:at + 2], order)  # noqa: E731
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    for i in range(u16(ifd)):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if u16(entry) == 0x0112 and u16(entry + 2) == 3:  # SHORT: the value sits in the entry
            value = u16(entry + 8)
            return value if 1 <= value <= 8 else 1
    return 1


def check_scan_markers(buf: memoryview, pos: int) -> None:
    """Raise :class:`JpegError` if the marker structure after the frame header breaks inside or
    after a scan. In scan data ``0xFF`` is only followed by ``0x00`` (stuffing), a restart marker,
    fill or a real marker, and every marker segment is followed by the next marker; garbage behind
    a valid header (which DALI decodes into noise without an error) breaks this as soon as it holds
    an ``0xFF`` byte, so it is caught here at the cost of one vectorised pass. ``pos``: the first
    marker after the frame header. Garbage without any ``0xFF`` byte is not seen here (libjpeg
    merely warns about it): :func:`mixflow.data.jpeg_entropy.entropy_walk` walks the data itself."""
    n = len(buf)
    arr = np.frombuffer(buf, np.uint8)
    marks = None  # positions of 0xFF followed by neither stuffing, a restart marker nor fill
    scanned = False  # a scan was seen: from there on every segment must end at a marker
    while pos + 4 <= n:
        if buf[pos] != 0xFF:
            if scanned:
                raise JpegError(f"corrupt JPEG data: no marker at byte {pos}, where the segment before ends")
            return
        marker = buf[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            return
        if scanned and (0x02 <= marker <= 0xBF or marker == 0xD8):
            raise JpegError(f"corrupt JPEG data: 0xFF 0x{marker:02X} at byte {pos} inside the scan data "
                            "(neither a marker nor stuffing)")
        if marker in _STANDALONE:
            pos += 2
            continue
        end = pos + 2 + ((buf[pos + 2] << 8) | buf[pos + 3])
        if scanned and end + 2 > n:
            raise JpegError(f"corrupt JPEG data: marker 0xFF 0x{marker:02X} at byte {pos} announces a segment "
                            "past the end of the data")
        if marker != 0xDA:
            pos = end
            continue
        if marks is None:
            ff = np.flatnonzero(arr[:-1] == 0xFF)
            after = arr[ff + 1]
            marks = ff[(after != 0x00) & (after != 0xFF) & ((after < 0xD0) | (after > 0xD7))]
        i = int(np.searchsorted(marks, end))
        if i == len(marks):
            return
        pos = int(marks[i])
        scanned = True


def jpeg_header(data: bytes | memoryview) -> JpegHeader:
    """Frame size, channels and EXIF orientation of a JPEG; :class:`JpegError` saying what is wrong."""
    buf = memoryview(data)
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        kind = next((name for magic, name in _OTHER_FORMATS if bytes(buf[:len(magic)]) == magic), None)
        raise JpegError("not a JPEG (no SOI marker)" + (f"; the data is {kind}" if kind else ""))
    tail = bytes(buf[max(0, n - 64):]).rstrip(b"\x00\r\n ")
    if not tail.endswith(b"\xff\xd9"):
        raise JpegError("truncated JPEG (no EOI marker at the end)")
    pos = 2
    orientation = 1
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
        if marker == 0xE1 and orientation == 1:  # APP1: EXIF (the first one that has the tag wins)
            orientation = exif_orientation(buf[pos + 4:min(n, pos + 2 + length)])
        if marker in _SOF:
            if pos + 10 > n:
                break
            height = (buf[pos + 5] << 8) | buf[pos + 6]
            width = (buf[pos + 7] << 8) | buf[pos + 8]
            channels = buf[pos + 9]
            if height == 0 or width == 0:
                raise JpegError(f"JPEG frame has zero size ({width}x{height})")
            check_scan_markers(buf, pos + 2 + length)
            return JpegHeader(height, width, channels, orientation)
        if marker == 0xDA:  # start of scan before any frame header
            break
        pos += 2 + length
    raise JpegError("corrupt JPEG (no frame header before the scan data)")
