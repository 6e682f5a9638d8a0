"""diffax_lab.files.write_atomic: a file is the old one or the new one, never half."""

import os

import pytest

from diffax_lab.files import write_atomic


def test_write_atomic_replaces_whole_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "config.json")
    write_atomic(path, "old")
    write_atomic(path, "new")
    assert open(path).read() == "new" and os.listdir(tmp_path) == ["config.json"]
    os.mkdir(path + ".tmp")  # the temporary file cannot be opened: the write fails
    with pytest.raises(IsADirectoryError):
        write_atomic(path, "half")
    assert open(path).read() == "new"
