"""runtime/files.py: every file is written all or nothing."""

import os
import stat

import pytest

from runtime.errors import PgError
from runtime.files import atomic_path, file_sha256, write_atomic


def test_write_atomic_writes_the_bytes_and_mode(tmp_path):
    write_atomic(tmp_path / "sub" / "a.py", b"data", mode=0o755)
    path = tmp_path / "sub" / "a.py"
    assert path.read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    assert file_sha256(path) == "3a6eb0790f39ac87c94f3856b2dd2c5d110e6811602261a9a923d3bb23adc8b7"


def test_a_directory_is_refused_with_one_line(tmp_path):
    with pytest.raises(PgError, match="is a directory; give a file name for the artifact"):
        write_atomic(tmp_path, b"x", "artifact")


def test_a_failure_inside_the_block_leaves_neither_file(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "out.bin") as tmp:
            open(tmp, "wb").write(b"half")
            raise ValueError("killed half-way")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_place_is_one_line_and_no_file(tmp_path):
    (tmp_path / "a_file").write_bytes(b"")
    with pytest.raises(PgError, match="failed while writing the plot"):
        write_atomic(tmp_path / "a_file" / "x.png", b"x", "plot")  # a file where a folder should be
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


def test_an_existing_file_is_replaced_whole(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old and longer")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
