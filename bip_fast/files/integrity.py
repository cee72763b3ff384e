"""File integrity: a content checksum on every torch file the engine writes.

Checksum. ``torch.save`` writes a zip archive; its end-of-central-directory record (the last 22
bytes) ends with a comment length, 0 as written. :func:`seal` sets the comment to
``bip_fast.sha256:<hex digest of the archive as torch wrote it>``. A zip comment is part of the
format, so ``torch.load`` (any mode, also ``weights_only`` and ``mmap``) and every zip reader still
read the file: the format is unchanged. :func:`unseal` recomputes the digest (the comment length
set back to 0) and raises on a mismatch. Files without the comment (written before checksums, or
by plain ``torch.save``) load unverified; :func:`status` tells which kind a file is.

Cost: one SHA-256 pass over the bytes per save and per load (about 1-2 GB/s on one core), small
next to serialisation itself.
"""
from __future__ import annotations

import hashlib
import struct
from typing import Optional

__all__ = ["seal", "sealed_tail", "unseal", "status", "ChecksumError"]

_EOCD_SIG = b"PK\x05\x06"
_EOCD_LEN = 22
_PREFIX = b"bip_fast.sha256:"
_DIGEST_HEX = 64


class ChecksumError(ValueError):
    """A file's content does not match the checksum it carries (bit rot, a partial copy, an edit)."""


def _eocd_offset(data) -> Optional[int]:
    """Offset of the end-of-central-directory record, or None (not a zip archive)."""
    n = len(data)
    if n < _EOCD_LEN:
        return None
    if bytes(data[n - _EOCD_LEN:n - _EOCD_LEN + 4]) == _EOCD_SIG:  # no comment: the usual case
        return n - _EOCD_LEN
    sealed = _EOCD_LEN + len(_PREFIX) + _DIGEST_HEX
    if n >= sealed and bytes(data[n - sealed:n - sealed + 4]) == _EOCD_SIG:
        return n - sealed
    return None


def sealed_tail(data) -> bytes:
    """The bytes that replace the last 2 of a ``torch.save`` archive (its zero comment length) to
    seal it: the new comment length and the comment. ``data`` may be a memoryview (no copy)."""
    at = _eocd_offset(data)
    if at is None or at != len(data) - _EOCD_LEN:
        raise ValueError("seal: expected a torch.save zip archive without a comment")
    comment = _PREFIX + hashlib.sha256(data).hexdigest().encode()
    return struct.pack("<H", len(comment)) + comment


def seal(data: bytes) -> bytes:
    """``torch.save`` output -> the same archive carrying its SHA-256 as the zip comment."""
    return bytes(data[:-2]) + sealed_tail(data)


def _split(data):
    """-> (archive as written by torch, stored hex digest) or (data, None) when not sealed."""
    at = _eocd_offset(data)
    if at is None:
        return data, None
    (clen,) = struct.unpack("<H", bytes(data[at + 20:at + 22]))
    comment = bytes(data[at + _EOCD_LEN:])
    if clen != len(comment) or not comment.startswith(_PREFIX):
        return data, None
    original = bytes(data[:at + 20]) + b"\x00\x00"
    return original, comment[len(_PREFIX):].decode("ascii", "replace")


def status(data) -> str:
    """``"verified"``, ``"unsealed"`` (no checksum: an older or foreign file) or ``"corrupt"``."""
    original, stored = _split(data)
    if stored is None:
        return "unsealed"
    return "verified" if hashlib.sha256(original).hexdigest() == stored else "corrupt"


def unseal(data, path) -> bytes:
    """Verify a sealed file's bytes; returns them for ``torch.load``. Raises :class:`ChecksumError`
    naming ``path`` on a mismatch. Unsealed data passes through unchanged."""
    original, stored = _split(data)
    if stored is None:
        return bytes(data)
    actual = hashlib.sha256(original).hexdigest()
    if actual != stored:
        raise ChecksumError(f"'{path}' is corrupted: its content does not match its checksum (stored sha256 "
                            f"{stored[:12]}..., content {actual[:12]}...); restore it from a copy or rerun")
    return bytes(data)
