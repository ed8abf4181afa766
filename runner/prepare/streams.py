"""An input file's bytes, decompressed as they are read (gzip, zstd), and the errors a damaged or cut-short
stream raises, so the reader can name the file and the last line it read whole.

zstandard's own stream reader ends quietly at a frame cut short (an interrupted download or copy), which
would lose the rest of the file without a word; frames are decoded here with its decompression object,
which says whether a frame ended.
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path
from typing import IO

ZSTD_PIECE = 4 << 10  # compressed bytes per decompress call: bounds what one call can inflate to (~128 MiB at worst)


class CutShort(EOFError):
    """The compressed data ended inside a frame."""


def open_bytes(path: Path, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrames(path.open("rb")), buffer_size=1 << 16)
    return path.open("rb")


def broken_stream_errors() -> tuple[type[Exception], ...]:
    """What reading a damaged, cut-short or mislabelled compressed file raises (gzip's EOFError included)."""
    import zstandard

    return EOFError, gzip.BadGzipFile, zlib.error, zstandard.ZstdError


class _ZstdFrames(io.RawIOBase):
    """Consecutive zstd frames (as `zstd` and `pzstd` write them), decompressed; input that ends inside a
    frame raises `CutShort` instead of ending the stream."""

    def __init__(self, raw: IO[bytes]) -> None:
        import zstandard

        self._raw, self._new = raw, zstandard.ZstdDecompressor().decompressobj
        self._frame = None  # the frame being decoded, None between frames
        self._out, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            piece = self._raw.read(ZSTD_PIECE)
            if not piece:
                if self._frame is not None:
                    raise CutShort("it ends inside a frame")
                return 0
            self._out, self._at = self._decompress(piece), 0
        count = min(len(buffer), len(self._out) - self._at)
        buffer[:count] = self._out[self._at:self._at + count]
        self._at += count
        return count

    def _decompress(self, piece: bytes) -> bytes:
        out = []
        while piece:
            if self._frame is None:
                self._frame = self._new()
            out.append(self._frame.decompress(piece))
            if not self._frame.eof:
                break
            piece, self._frame = self._frame.unused_data, None  # the next frame starts right after
        return b"".join(out)

    def close(self) -> None:
        self._raw.close()
        super().close()
