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


# ------------------------------------------------------------------------------ staged folders
from kamim import outputs  # noqa: E402


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != MARKER)


def test_staged_dir_replaces_its_own_output_atomically(tmp_path):
    out = tmp_path / "out"
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "a.txt").write_text("1")
        assert not out.exists()
    assert _files(out) == ["a.txt"] and output_command(out) == "kamim-analyze run"
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "b.txt").write_text("2")
        assert _files(out) == ["a.txt"]  # the old output stays until the new one is complete
    assert _files(out) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").touch()
    if not outputs._exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system")
    assert [p.name for p in b.iterdir()] == ["from_a"] and not list(a.iterdir())


def test_staged_dir_without_exchange_and_recovery_of_a_killed_swap(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "v1").touch()
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "v2").touch()
    assert _files(out) == ["v2"]
    # state after a kill between the fallback's two renames: no out, the old output aside
    os.replace(out, tmp_path / ".out.k1ll3d.old")
    (tmp_path / ".out.zzzz.partial").mkdir()  # and a half-written staging folder
    with pytest.raises(RuntimeError):
        with outputs.staged_dir(out, "kamim-analyze run"):
            raise RuntimeError("boom")
    assert _files(out) == ["v2"]  # restored, debris removed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out"]


def test_staged_dir_writes_through_a_symlink(tmp_path):
    target = tmp_path / "real"
    with outputs.staged_dir(target, "kamim-analyze run") as staging:
        (staging / "old").touch()
    link = tmp_path / "link"
    link.symlink_to(target)
    with outputs.staged_dir(link, "kamim-analyze run") as staging:
        (staging / "new").touch()
    assert link.is_symlink() and _files(target) == ["new"]


def test_staged_dir_is_exclusive(tmp_path):
    out = tmp_path / "out"
    with outputs.staged_dir(out, "kamim-analyze run"):
        with pytest.raises(OutputDirError, match=rf"--out '.*out' is in use by another process \(pid {os.getpid()}\)"):
            with outputs.staged_dir(out, "kamim-analyze run"):
                pass


# --------------------------------------------------------------------------- inputs and user files

def _tree(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_may_not_be_contain_or_lie_inside_an_input(tmp_path, overwrite):
    data = tmp_path / "imgs"
    (data / "cls").mkdir(parents=True)
    (data / "cls" / "a.png").write_text("image")
    ckpt = tmp_path / "runs" / "r1" / "encoder.safetensors"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_text("weights")
    inputs = {"--data folder": data, "checkpoint": ckpt, "name": "vit_small_patch16_224", "none": None}
    for out, relation, what in [(data, "is", "--data folder"), (data / "cls" / "res", "lies inside", "--data folder"),
                                (tmp_path / "runs", "contains", "checkpoint"), (ckpt, "is", "checkpoint")]:
        with pytest.raises(OutputDirError, match=rf"^--out '{out}' {relation} the {what} '.*': write the output "
                                                 r"apart from the inputs \(--overwrite does not change this\)$"):
            check_output_dir(out, "kamim-analyze run", overwrite=overwrite, inputs=inputs)
    # through a symlink too
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(OutputDirError, match="is the --data folder"):
        check_output_dir(tmp_path / "link", "kamim-analyze run", overwrite=overwrite, inputs=inputs)
    assert check_output_dir(tmp_path / "elsewhere", "x", overwrite=overwrite, inputs=inputs) == tmp_path / "elsewhere"
    assert _tree(data) == {"cls/a.png": "image"}


def test_replacing_an_output_keeps_what_the_command_did_not_write(tmp_path):
    out = tmp_path / "rep"
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "metrics.csv").write_text("v1")
        (staging / "raw").mkdir()
        (staging / "raw" / "a.npz").write_text("arrays v1")
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "a.txt").write_text("mine too")
    (out / "raw" / "extra.txt").write_text("added beside the arrays")
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "metrics.csv").write_text("v2")  # raw/a.npz is not written this time: it was ours
    assert _tree(out) == {".kamim-output.json": (out / MARKER).read_text(), "metrics.csv": "v2",
                          "notes.txt": "mine", "mine/a.txt": "mine too", "raw/extra.txt": "added beside the arrays"}
    assert json.loads((out / MARKER).read_text())["files"] == ["metrics.csv"]


def test_a_kill_during_the_swap_loses_no_user_file(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "metrics.csv").write_text("v1")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)

    def killed(a, b):
        raise KeyboardInterrupt  # the process dies after the user's files were linked into staging

    monkeypatch.setattr(outputs, "_exchange", killed)
    with pytest.raises(KeyboardInterrupt):
        with outputs.staged_dir(out, "kamim-analyze run") as staging:
            (staging / "metrics.csv").write_text("v2")
    assert _tree(out) == before
    debris = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert len(debris) == 1 and (debris[0] / "notes.txt").read_text() == "mine"  # a second name, not a move
    monkeypatch.undo()
    with outputs.staged_dir(out, "kamim-analyze run") as staging:  # the next run removes the debris
        (staging / "metrics.csv").write_text("v3")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.csv").read_text() == "v3"


def test_overwrite_means_the_same_in_both_command_line_tools(capsys):
    from analysis.cli import main as analyze
    from kamim.cli import main as kamim

    texts = []
    for main, argv in ((kamim, ["knn", "--help"]), (kamim, ["pretrain", "--help"]), (analyze, ["run", "--help"])):
        with pytest.raises(SystemExit):
            main(argv)
        texts.append(" ".join(capsys.readouterr().out.split()))
    for text in texts:
        assert "--overwrite use --out even if it holds files this command did not write: they are kept, files of " \
               "the same name are replaced" in text


def test_every_command_takes_the_same_lock_for_a_folder(tmp_path):
    """An in-place writer (pretrain, probe, knn) and a folder-replacing one (kamim-analyze) lock the
    same file, so neither can run into a folder the other is writing."""
    out = tmp_path / "X"
    with outputs.lock_output(out):  # e.g. kamim pretrain --out X, running
        with pytest.raises(OutputDirError, match=rf"is in use by another process \(pid {os.getpid()}\)"):
            with outputs.staged_dir(out, "kamim-analyze run"):
                pass
    with outputs.staged_dir(out, "kamim-analyze run") as staging:  # and the other way round
        (staging / "a.txt").write_text("a")
        with pytest.raises(OutputDirError, match="is in use by another process"):
            outputs.lock_output(out)
    (tmp_path / "link").symlink_to(out)
    assert outputs.lock_path(tmp_path / "link") == outputs.lock_path(out) == tmp_path / ".X.lock"


def test_debris_cleanup_takes_only_this_outputs_staging_folders(tmp_path):
    """``--out res`` must not remove the live staging folder of a concurrent ``--out res.v2``."""
    other = make_temp_dir(tmp_path, prefix=".res.v2.", suffix=".partial")
    (other / "raw").mkdir()
    mine = make_temp_dir(tmp_path, prefix=".res.", suffix=".partial")  # a killed run of res
    with outputs.staged_dir(tmp_path / "res", "kamim-analyze run") as staging:
        (staging / "a.txt").write_text("a")
    assert other.is_dir() and (other / "raw").is_dir() and not mine.exists()


def test_a_lock_that_cannot_be_created_is_one_clean_error(tmp_path):
    """A lock file that cannot be opened (read-only folder, a path under a file) is one error, with no
    'Exception ignored in OutputLock.__del__' after it."""
    import subprocess
    import sys

    (tmp_path / "file").write_text("x")
    lock = tmp_path / "file" / ".out.lock"  # a path under a file: open() fails for every user
    code = ("from kamim.outputs import OutputLock, OutputDirError\n"
            f"try:\n    OutputLock({str(lock)!r}, 'an output')\nexcept OutputDirError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.strip() == f"cannot create the lock file '{lock}' for an output: Not a directory"


@pytest.mark.parametrize("name, message", [("run\nx", "contains a line break"),
                                           (os.fsdecode(b"run\xff"), "is not valid UTF-8")])
def test_output_names_that_metadata_cannot_hold_are_refused_up_front(tmp_path, name, message):
    """Such a run used to train (exit 0) and leave an export that could not be loaded."""
    with pytest.raises(OutputDirError, match=message):
        check_output_dir(tmp_path / name, "kamim pretrain")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("length", [240, 255])
def test_the_longest_legal_output_names_are_locked_and_staged(tmp_path, length):
    """A legal name up to the file system's 255 bytes: its lock and staging names are shortened (a
    prefix and a hash of the whole name), stay one per folder, and killed stagings are still found."""
    out = tmp_path / ("r" * (length - 1) + "x")
    twin = tmp_path / ("r" * (length - 1) + "y")  # same first 180 bytes: a different lock and stem
    assert outputs.lock_path(out) != outputs.lock_path(twin)
    assert all(len(p.name.encode()) <= 255 for p in (outputs.lock_path(out), outputs.lock_path(twin)))
    killed = make_temp_dir(tmp_path, prefix=outputs.sibling_stem(out) + ".", suffix=".partial")
    other = make_temp_dir(tmp_path, prefix=outputs.sibling_stem(twin) + ".", suffix=".partial")
    with outputs.staged_dir(out, "kamim-analyze run") as staging:
        (staging / "a.txt").write_text("a")
        with pytest.raises(OutputDirError, match="is in use by another process"):
            outputs.lock_output(out)  # the in-place writers' lock is the same file
    assert (out / "a.txt").read_text() == "a" and not killed.exists() and other.is_dir()
    with outputs.lock_output(out), outputs.lock_output(twin):
        pass
