"""The decoded bytes of a .nii or .nii.gz, inflated on demand and never beyond what is asked for.

A reader that asks for the header, then for exactly the voxels the header declares, holds no more
than that in memory, whatever the file's gzip stream would inflate to. ISA-L's inflate (zlib's
where no wheel exists) is fed a megabyte of file at a time and asked for at most 16 MB per call.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Iterable, Optional

from lits.core.errors import BadInputError

try:  # ISA-L's inflate is ~2x zlib's on CT data; fall back to zlib where no wheel exists
    from isal import isal_zlib as _zlib_impl
except ImportError:  # pragma: no cover - exercised only where isal is missing
    import zlib as _zlib_impl

_GZIP_MAGIC = b"\x1f\x8b"
_FEED = 1 << 20  # file bytes handed to the inflater per call (bounds its unconsumed tail)
_PIECE = 16 << 20  # decoded bytes asked of it per call (bounds what one call allocates)


class DecodedStream:
    """The decoded bytes of a .nii or .nii.gz, inflated on demand and never beyond what is asked.

    Args:
        chunks: the file's bytes, in one piece or as a streamed read yields them.
        name: how errors name the input.
    A gzip file may hold several members (pigz, bgzip); bytes after a member that do not start
    another one set `garbage`.
    """

    def __init__(self, chunks: Iterable[bytes], name: str):
        self._chunks = iter(chunks)
        self._pending: Deque[memoryview] = deque()
        self._name = name
        self._gzip: Optional[bool] = None
        self._member = None  # the current gzip member's inflater
        self.garbage = False

    def _more(self) -> bool:
        chunk = next(self._chunks, None)
        if chunk is None:
            return False
        if len(chunk):
            self._pending.append(memoryview(chunk))
        return True

    def _peek(self, n: int) -> bytes:
        while sum(map(len, self._pending)) < n and self._more():
            pass
        out = b""
        for piece in self._pending:
            out += bytes(piece[: n - len(out)])
            if len(out) == n:
                break
        return out

    def _take(self, n: int) -> Optional[memoryview]:
        """At most n file bytes; None at the end of the file."""
        while not self._pending:
            if not self._more():
                return None
        piece = self._pending.popleft()
        if len(piece) > n:
            self._pending.appendleft(piece[n:])
            piece = piece[:n]
        return piece

    def _next(self, limit: int):
        """Up to `limit` decoded bytes; empty at the end of the data."""
        if self._gzip is None:
            self._gzip = self._peek(2) == _GZIP_MAGIC
        if not self._gzip:
            piece = self._take(limit)
            return b"" if piece is None else piece
        while True:
            if self._member is None:
                head = self._peek(2)
                if head != _GZIP_MAGIC:
                    self.garbage = bool(head)
                    return b""
                self._member = _zlib_impl.decompressobj(wbits=31)
            feed = self._take(_FEED)
            try:
                piece = self._member.decompress(b"" if feed is None else feed, limit)
            except Exception as exc:  # isal/zlib raise several types for corrupt streams
                raise BadInputError(f"{self._name}: truncated or corrupt gzip data ({exc}); re-download the file") from exc
            rest = self._member.unused_data if self._member.eof else self._member.unconsumed_tail
            if len(rest):
                self._pending.appendleft(memoryview(rest))
            if self._member.eof:
                self._member = None
            if piece:
                return piece
            if feed is None and self._member is not None:
                raise BadInputError(f"{self._name}: truncated or corrupt gzip data (the file ends inside the "
                                    "stream); re-download the file")

    def readinto(self, view: memoryview) -> int:
        """Fill `view` with decoded bytes; fewer only at the end of the data. Returns the count."""
        done = 0
        while done < len(view):
            piece = self._next(min(len(view) - done, _PIECE))
            if not len(piece):
                break
            view[done:done + len(piece)] = piece
            done += len(piece)
        return done

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[: self.readinto(memoryview(buf))])

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            piece = self._next(min(n - done, _PIECE))
            if not len(piece):
                break
            done += len(piece)
        return done

    def at_end(self) -> bool:
        """Whether nothing follows what was read (inflates at most one byte more to know)."""
        return not len(self._next(1)) and not self.garbage
