"""Artifact files, public for the package and its tools: atomic writes (a temporary name, renamed when
complete), advisory file locks (blocking, and an exclusive one that names its holder), sha256 of files and their check against a stage manifest, JSON reading, the UTF-8 check of text inputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from nxm_deploy.run.layout import MANIFEST


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory, ``fsync`` and ``os.replace``: readers see
    the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created) for the duration of the block (POSIX ``flock``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class LockBusy(Exception):
    """:func:`exclusive_lock` found the lock held by another process; ``holder`` is what that process wrote into the
    lock file ({} when it could not be read)."""

    def __init__(self, path: Path, holder: dict):
        super().__init__(f"{path} is held by {holder or 'another process'}")
        self.path, self.holder = path, holder


def _read_holder(handle) -> dict:
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


@contextlib.contextmanager
def exclusive_lock(path: str | Path, holder: dict) -> Iterator[dict]:
    """Hold an exclusive advisory lock on ``path`` (POSIX ``flock``, non-blocking) and write ``holder`` (JSON) into it.

    The kernel releases the lock when its process ends, however it ends, so a lock whose holder died is free; its
    holder's record is still in the file, and is what this yields (``{}`` after a clean release, which empties the
    file). The file itself is never deleted (another process may have it open).

    Yields:
        dict: the record of a previous holder that ended without releasing (killed), else ``{}``.

    Raises:
        LockBusy: another process holds the lock (its record in ``.holder``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock
        yield {}
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(path, _read_holder(handle)) from None
        try:
            stale = _read_holder(handle)
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder))
            handle.flush()
            yield stale
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def atomic_write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf limit: bigger models keep weights in external data


def write_onnx(model, path: str | Path, check=None) -> Path:
    """The one atomic ONNX writer: save ``model`` (an ``onnx.ModelProto``) to a temporary file beside ``path``, run
    ``check(tmp_path)`` on it when given (``onnx.checker``, an ONNX Runtime session), then rename it to ``path``; on any
    error the temporary file is removed and the error raised. Weights go to external data ``<name>.data`` when the
    proto exceeds protobuf's 2 GB limit (:data:`EXTERNAL_DATA_BYTES`).

    Returns:
        Path: ``path``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if model.ByteSize() > EXTERNAL_DATA_BYTES:
            onnx.save(model, str(tmp), save_as_external_data=True, location=path.name + ".data")
        else:
            onnx.save(model, str(tmp))
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_json(path: str | Path):
    with open(path) as handle:
        return json.load(handle)


def file_hashes(directory: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``directory`` (a stage's output), ``exclude`` left out."""
    directory = Path(directory)
    return {path.relative_to(directory).as_posix(): sha256_file(path)
            for path in sorted(directory.rglob("*")) if path.is_file() and path.name not in exclude}


def check_sha256(path: str | Path, expected: str, *, manifest: str | Path, regenerate: str,
                 data: bytes | None = None) -> None:
    """Refuse an artifact whose bytes are not the ones its producer recorded.

    Args:
        path: the artifact. expected: the sha256 its manifest records. manifest: that manifest (for the message).
        regenerate: the command that writes it again. data: the bytes already read from ``path`` (hashed
            instead of reading the file again, so the bytes checked are the bytes used).

    Raises:
        RunDirError: the file is missing or differs (one line: which file, which manifest, how to regenerate).
    """
    from nxm_deploy.errors import RunDirError

    path = Path(path)
    if data is None and not path.is_file():
        raise RunDirError(f"{path} (recorded in {manifest}) is missing.", hint=f"Regenerate it: `{regenerate}`.")
    actual = hashlib.sha256(data).hexdigest() if data is not None else sha256_file(path)
    if actual != expected:
        raise RunDirError(
            f"{path} does not match {manifest}: sha256 {actual}, the manifest records {expected}.",
            hint=f"The file was changed after it was written; regenerate it: `{regenerate}`.",
        )


def check_recorded_file(path: str | Path, regenerate: str) -> None:
    """Check ``path`` against the sha256 that the ``manifest.json`` beside it records for it (key ``files``).

    Nothing to check when there is no such manifest or it records no hash for the file (a run written before
    hashes were recorded).

    Raises:
        RunDirError: the file differs from what its stage wrote (see :func:`check_sha256`).
    """
    path = Path(path)
    manifest_path = path.parent / MANIFEST
    if not manifest_path.is_file():
        return
    recorded = (read_json(manifest_path).get("files") or {}).get(path.name)
    if recorded:
        check_sha256(path, recorded, manifest=manifest_path, regenerate=regenerate)


def verify_stage_files(stage_dir: str | Path, regenerate: str) -> dict:
    """Check every file a stage recorded in ``stage_dir/manifest.json`` (key ``files``); returns the manifest.

    Raises:
        RunDirError: a recorded file is missing or changed (see :func:`check_sha256`), or the manifest is absent.
    """
    from nxm_deploy.errors import RunDirError

    stage_dir = Path(stage_dir)
    manifest_path = stage_dir / MANIFEST
    if not manifest_path.is_file():
        raise RunDirError(f"{stage_dir} has no {MANIFEST}: the stage did not finish.",
                          hint=f"Run `{regenerate}`.")
    manifest = read_json(manifest_path)
    for rel, expected in (manifest.get("files") or {}).items():
        check_sha256(stage_dir / rel, expected, manifest=manifest_path, regenerate=regenerate)
    return manifest


#: bytes :func:`check_utf8` reads at a time: a file is checked whole without being held in memory
CHUNK_BYTES = 1 << 20


def check_utf8(path: str | os.PathLike, what: str = "Data file", hint: str | None = None, *, error=None,
               chunk_bytes: int = CHUNK_BYTES) -> None:
    """Check that every byte of ``path`` is UTF-8 (a UTF-8 byte order mark is UTF-8 too): the one check of the
    text files nxm-deploy reads (GLUE TSV, your own data, recipes, engine specs).

    Args:
        path (str | os.PathLike): the file.
        what (str): its kind for the message (``"GLUE file"``, ``"Data file"``, ``"Recipe file"``).
        hint (str | None): said after the conversion command in the hint (e.g. where a good copy comes from).
        error: the :class:`~nxm_deploy.errors.NxmError` subclass raised (default ``DataError``; ``ConfigError``
            for configuration files).
        chunk_bytes (int): read size; a character cut by a chunk boundary is joined to the next chunk.

    Raises:
        DataError (or ``error``): at the first byte that is not UTF-8: the file, the byte offset (0-based, from the
            start of the file), the line (1-based) and the byte's value, with an ``iconv`` command as the hint.
    """
    if error is None:
        from nxm_deploy.errors import DataError as error
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
                    raise _not_utf8(error, path, what, hint, offset + exc.start,
                                    line + data.count(b"\n", 0, exc.start), data[exc.start]) from None
            line += data.count(b"\n", 0, good)
            offset += good
            carry = data[good:]


def _not_utf8(error, path, what: str, hint: str | None, offset: int, line: int, byte: int):
    p = Path(path)
    out = p.with_name(f"{p.stem}.utf8{p.suffix}")
    convert = f"iconv -f latin1 -t utf-8 {shlex.quote(str(p))} > {shlex.quote(str(out))}"
    return error(
        f"{what} {p} is not UTF-8 text: the first bad byte, 0x{byte:02x}, is at byte offset {offset} (line {line}).",
        hint=f"Convert the file to UTF-8, e.g. `{convert}` if it is Latin-1"
             + (f"; {hint}" if hint else "."),
    )
