"""The UTF-8 check of the text files the data readers open: GLUE TSV files (:mod:`nxm_deploy.data.glue`) and your
own data files (:mod:`nxm_deploy.data.files`). A file that is not UTF-8 is one :class:`DataError` naming the file,
the byte offset and the line of its first bad byte, whichever reader opened it.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from nxm_deploy.errors import DataError

CHUNK_BYTES = 1 << 20
"""Bytes read at a time: a file is checked whole without being held in memory."""


def check_utf8(path: str | os.PathLike, what: str = "Data file", hint: str | None = None,
               chunk_bytes: int = CHUNK_BYTES) -> None:
    """Check that every byte of ``path`` is UTF-8 (a UTF-8 byte order mark is UTF-8 too).

    Args:
        path (str | os.PathLike): the file.
        what (str): its kind for the message (``"GLUE file"``, ``"Data file"``).
        hint (str | None): said after the conversion command in the hint (e.g. where a good copy comes from).
        chunk_bytes (int): read size; a character cut by a chunk boundary is joined to the next chunk.

    Raises:
        DataError: at the first byte that is not UTF-8: the file, the byte offset (0-based, from the start of the
            file), the line (1-based) and the byte's value, with an ``iconv`` command as the hint.
    """
    offset, line, carry = 0, 1, b""
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(chunk_bytes)
            data = carry + chunk
            if not data:
                return
            try:
                data.decode("utf-8")
                good = len(data)
            except UnicodeDecodeError as exc:
                if chunk and exc.end == len(data) and exc.reason == "unexpected end of data":
                    good = exc.start  # a character cut at the chunk's end: decided by the next chunk
                else:
                    raise _not_utf8(path, what, hint, offset + exc.start,
                                    line + data.count(b"\n", 0, exc.start), data[exc.start]) from None
            line += data.count(b"\n", 0, good)
            offset += good
            carry = data[good:]


def _not_utf8(path, what: str, hint: str | None, offset: int, line: int, byte: int) -> DataError:
    p = Path(path)
    out = p.with_name(f"{p.stem}.utf8{p.suffix}")
    convert = f"iconv -f latin1 -t utf-8 {shlex.quote(str(p))} > {shlex.quote(str(out))}"
    return DataError(
        f"{what} {p} is not UTF-8 text: the first bad byte, 0x{byte:02x}, is at byte offset {offset} (line {line}).",
        hint=f"Convert the file to UTF-8, e.g. `{convert}` if it is Latin-1"
             + (f"; {hint}" if hint else "."),
    )
