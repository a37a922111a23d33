"""Files written all-or-nothing, and their digests.

Every file pgbuild or an artifact writes (artifacts, checkpoints, shards, NLL dumps, run logs,
plots) goes through `write_atomic`: a reader, or a run killed half-way, never sees a partial file
under the final name.
"""

import contextlib
import hashlib
import os

from .errors import PgError


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # checkpoints run to hundreds of MB
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path, what="file"):
    """Yields a temporary name beside `path` to write to; renamed onto `path` when the block ends
    normally, removed when it raises. `what` names the file in the one-line error."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise PgError(f"{path}: is a directory; give a file name for the {what}")
    folder, name = os.path.split(path)
    # Hidden, so that globs over the folder (shards, artifacts) never pick a half-written file up.
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        raise PgError(f"{path}: failed while writing the {what} ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data, what="file", mode=None):
    """`data` (bytes) at `path`, all or nothing; `mode` sets its permission bits."""
    with atomic_path(path, what) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
