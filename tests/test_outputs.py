"""The output-folder rule (kamim.outputs) and file modes that follow the umask."""
from __future__ import annotations

import json
import os
import stat

import pytest

from kamim.outputs import MARKER, OutputDirError, check_output_dir, mark_output_dir, output_command
from kamim.serialization import atomic_write_text, make_temp_dir


def test_new_empty_own_and_legacy_folders_are_accepted(tmp_path):
    assert check_output_dir(tmp_path / "new", "kamim knn") == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "kamim knn")
    own = tmp_path / "own"
    own.mkdir()
    (own / "knn.csv").write_text("x")
    mark_output_dir(own, "kamim knn")
    assert json.loads((own / MARKER).read_text())["command"] == "kamim knn"
    check_output_dir(own, "kamim knn")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "knn.json").write_text("{}")
    check_output_dir(legacy, "kamim knn", legacy=("knn.json",))


def test_foreign_folders_are_refused_unless_overwrite(tmp_path):
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    for name in ("notes.txt", "a.txt", "b.txt", "c.txt"):
        (user / name).write_text("mine")
    with pytest.raises(OutputDirError, match=r"holds files this command did not write \(a.txt, b.txt, c.txt "
                                             r"and 2 more\); .* --overwrite"):
        check_output_dir(user, "kamim knn", legacy=("knn.json",))
    assert check_output_dir(user, "kamim knn", overwrite=True) == user
    other = tmp_path / "other"
    other.mkdir()
    mark_output_dir(other, "kamim pretrain")
    (other / "knn.json").write_text("{}")  # a marker names the writer; legacy names do not override it
    with pytest.raises(OutputDirError, match="holds an output of 'kamim pretrain'"):
        check_output_dir(other, "kamim knn", legacy=("knn.json",))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", "kamim knn", overwrite=True)
    with pytest.raises(OutputDirError, match="--out is empty"):
        check_output_dir("", "kamim pretrain")
    (other / MARKER).write_text("not json")
    assert output_command(other) is None


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_written_files_and_staging_folders_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = atomic_write_text("x", tmp_path / "f.txt")
        folder = make_temp_dir(tmp_path, prefix=".stage.")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
