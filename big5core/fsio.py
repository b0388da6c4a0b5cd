"""Durable file-system steps: fsync files and folders, rename durably, write a small file atomically.

A rename is atomic but not durable: after a power cut the new name can be gone, or present with
files whose data never reached the disk. The order that makes a move survive one is: fsync every
file, then the folders that hold them (their entries), rename, then fsync the folder(s) whose
entries the rename changed. :func:`fsync_tree` and :func:`replace` do those steps;
:func:`write_atomically` uses them for a single small file (a marker).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync one file or folder (a folder: its entries)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder, deepest first, ``root`` last."""
    folders: list[Path] = []
    for current, dirnames, filenames in os.walk(root):
        here = Path(current)
        folders.append(here)
        for name in filenames:
            path = here / name
            if not path.is_symlink():
                fsync_path(path)
        dirnames.sort()
    for folder in reversed(folders):
        fsync_path(folder)


def replace(source: Path, target: Path) -> None:
    """``os.replace(source, target)``, then fsync the folders whose entries changed.

    The caller fsyncs ``source``'s contents first (:func:`fsync_tree`).
    """
    os.replace(source, target)
    fsync_path(target.parent)
    if source.parent.resolve() != target.parent.resolve():
        fsync_path(source.parent)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new folders survive a power cut (each new one's parent is fsynced)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        fsync_path(folder.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` so that it is either absent or complete, also after a power cut."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    replace(temporary, path)
