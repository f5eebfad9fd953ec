"""Robustness of the image-folder data layer: symlink loops, non-regular entries, unreadable folders,
GIF support and actionable layout errors. Every case uses real files under ``tmp_path``."""
from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from kamim.data import (
    CorruptImageWarning,
    EvalTransform,
    ImageFolderDataset,
    ImageLoadError,
    collate_skip_bad,
    find_images,
    load_rgb,
)


def _save(photos, path: Path, name: str = "astronaut", size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(photos[name][:size, :size])).save(path)
    return path


def _rel(root: Path, paths) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def _find(root: Path, **kwargs) -> tuple[list[Path], list[str]]:
    """find_images plus the messages of the warnings it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = find_images(root, **kwargs)
    return found, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------- symlinks
def test_symlink_loop_visits_each_file_once_with_one_warning(tmp_path, photos):
    root = tmp_path / "data"
    for i in range(3):
        _save(photos, root / "cls" / f"{i}.png", size=16 + i)
    _save(photos, root / "other" / "x.png", "coffee")
    os.symlink(".", root / "cls" / "again")  # loop: cls/again/again/... -> cls
    (root / "other" / "deep").mkdir()
    os.symlink("..", root / "other" / "deep" / "up")  # loop back to an ancestor (other/)
    os.symlink("other", root / "other_link")  # a second link to a folder already listed
    os.symlink("../cls/0.png", root / "other" / "alias.png")  # a second name for one file
    found, messages = _find(root)
    assert _rel(root, found) == ["cls/0.png", "cls/1.png", "cls/2.png", "other/x.png"]
    assert len(messages) == 1, messages
    assert "loop" in messages[0] and "\n" not in messages[0]
    assert "again" in messages[0] or "up" in messages[0]
    assert "2 symlink loops and 2 symlinks" in messages[0]
    with pytest.warns(UserWarning, match="loop"):
        assert find_images(root) == found  # deterministic
    with pytest.warns(UserWarning, match="loop"):
        ds = ImageFolderDataset(root, strict=True)  # loops are skipped, not an error
    assert ds.classes == ["cls", "other"] and ds.targets == [0, 0, 0, 1]


def test_symlinked_folder_without_loop_is_followed(tmp_path, photos):
    real = tmp_path / "real"
    _save(photos, real / "a.png")
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(real, root / "linked")
    found, messages = _find(root)
    assert _rel(root, found) == ["linked/a.png"] and messages == []


# ----------------------------------------------------------------------------- non-regular entries
@pytest.fixture()
def odd_folder(tmp_path, photos, monkeypatch) -> Path:
    """Two real images next to a dangling link, a FIFO, a socket and a folder, all named like images."""
    root = tmp_path / "odd"
    _save(photos, root / "a.png")
    _save(photos, root / "b.jpg", "coffee")
    os.symlink("missing.jpg", root / "dangling.jpg")
    os.mkfifo(root / "fifo.jpg")
    monkeypatch.chdir(root)  # AF_UNIX paths are limited to ~100 bytes: bind a relative name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("sock.png")
    _save(photos, root / "folder.jpg" / "c.png", "chelsea")  # a folder named like an image is walked
    yield root
    sock.close()


def test_find_images_skips_non_regular_entries_with_one_warning(odd_folder):
    found, messages = _find(odd_folder)
    assert _rel(odd_folder, found) == ["a.png", "b.jpg", "folder.jpg/c.png"]
    assert len(messages) == 1, messages
    assert "skipped 3 entries" in messages[0] and "dangling.jpg" in messages[0]
    assert "\n" not in messages[0]


def test_find_images_strict_raises_one_line_for_non_regular_entry(odd_folder):
    with pytest.raises(ImageLoadError) as info:
        find_images(odd_folder, strict=True)
    assert info.value.path == odd_folder / "dangling.jpg" and "\n" not in str(info.value)
    with pytest.raises(ImageLoadError, match="dangling.jpg"):
        ImageFolderDataset(odd_folder, strict=True, layout="flat")
    with pytest.warns(UserWarning, match="skipped 3 entries"):
        assert len(ImageFolderDataset(odd_folder, layout="flat")) == 3


def test_load_rgb_non_regular_is_image_load_error(odd_folder):
    for name, reason in (("fifo.jpg", "FIFO"), ("sock.png", "socket"), ("folder.jpg", "directory"),
                         ("dangling.jpg", "dangling")):
        with pytest.raises(ImageLoadError) as info:
            load_rgb(odd_folder / name)  # never opens the FIFO (that would block)
        msg = str(info.value)
        assert name in msg and reason in msg and "\n" not in msg, msg
        assert info.value.path == odd_folder / name
    with pytest.raises(FileNotFoundError, match="dangling.jpg"):  # still a FileNotFoundError too
        load_rgb(odd_folder / "dangling.jpg")


@pytest.mark.parametrize("kind", ["removed", "dangling", "fifo", "folder"])
def test_entry_broken_after_listing_is_skipped_and_counted(tmp_path, photos, kind):
    root = tmp_path / "flat"
    for i in range(4):
        _save(photos, root / f"{i}.png", size=16 + i)
    ds = ImageFolderDataset(root, transform=EvalTransform(16))
    strict = ImageFolderDataset(root, transform=EvalTransform(16), strict=True)
    victim = root / "2.png"
    victim.unlink()
    if kind == "dangling":
        os.symlink("gone.png", victim)
    elif kind == "fifo":
        os.mkfifo(victim)
    elif kind == "folder":
        victim.mkdir()
    with pytest.warns(CorruptImageWarning, match="2.png"):
        assert ds[2] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptImageWarning)
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad))
    assert int(batches[0]["num_skipped"]) == 1 and batches[0]["image"].shape[0] == 3
    with pytest.raises(ImageLoadError) as info:
        strict[2]
    assert "2.png" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- unreadable folders
def _deny(monkeypatch, locked: Path) -> None:
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_subfolder_warns_once_naming_it(tmp_path, photos, monkeypatch):
    root = tmp_path / "data"
    _save(photos, root / "ok" / "a.png")
    _save(photos, root / "locked" / "b.png")
    _deny(monkeypatch, root / "locked")
    found, messages = _find(root)
    assert _rel(root, found) == ["ok/a.png"]
    assert len(messages) == 1 and "locked" in messages[0] and "Permission denied" in messages[0], messages
    with pytest.raises(PermissionError, match="locked"):
        find_images(root, strict=True)


def test_unreadable_root_is_an_error_naming_it(tmp_path, photos, monkeypatch):
    root = tmp_path / "data"
    _save(photos, root / "a.png")
    _deny(monkeypatch, root)
    with pytest.raises(PermissionError, match="data"):
        find_images(root)


# ----------------------------------------------------------------------------- extensions
def test_gif_is_found_and_loaded_first_frame(tmp_path, photos):
    frames = [Image.fromarray(np.ascontiguousarray(photos[n][:32, :40])) for n in ("astronaut", "coffee")]
    frames[0].save(tmp_path / "anim.GIF", save_all=True, append_images=frames[1:])
    found, messages = _find(tmp_path)
    assert _rel(tmp_path, found) == ["anim.GIF"] and messages == []
    img = load_rgb(found[0])
    assert img.mode == "RGB" and img.size == (40, 32)
    first = np.asarray(Image.open(tmp_path / "anim.GIF").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(img), first)


def test_unsupported_image_extensions_warned_once(tmp_path, photos):
    _save(photos, tmp_path / "a.png")
    for name in ("x.heic", "y.HEIC", "z.svg"):
        (tmp_path / name).write_bytes(b"not decoded")
    (tmp_path / "notes.txt").write_text("not an image")
    found, messages = _find(tmp_path)
    assert _rel(tmp_path, found) == ["a.png"]
    assert len(messages) == 1 and "3 files" in messages[0] and ".heic" in messages[0], messages


# ----------------------------------------------------------------------------- layout error
def test_mixed_layout_error_says_what_a_cli_user_can_do(tmp_path, photos):
    _save(photos, tmp_path / "top.png")
    _save(photos, tmp_path / "cat" / "a.png")
    with pytest.raises(ValueError) as info:
        ImageFolderDataset(tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and "top.png" in msg and "cat" in msg
    assert "--data" in msg and "class folder" in msg
    if "layout=" in msg:  # a Python-only option must be labelled as such
        assert "Python API" in msg


def test_hard_links_to_one_image_are_one_image(tmp_path, photos):
    root = tmp_path / "data"
    first = _save(photos, root / "a" / "0.png")
    _save(photos, root / "a" / "1.png", "coffee")
    (root / "b").mkdir()
    os.link(first, root / "b" / "same.png")  # a second name of a/0.png
    found, messages = _find(root)
    assert _rel(root, found) == ["a/0.png", "a/1.png"]
    assert len(messages) == 1 and "skipped 1 hard links to files already listed" in messages[0]
    assert "'b/same.png' is 'a/0.png'" in messages[0].replace(f"{root}/", "")
