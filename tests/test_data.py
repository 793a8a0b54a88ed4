import os
import sqlite3
from pathlib import Path

import pytest

from kmgpu import data
from kmgpu.data import scan

# Names whose output names clash in every way the walk resolves: a shared stem (a.jpg, a.png), a
# renamed output that another input's own output already is (a.png -> a.png.png, as a.png.png's:
# numbered, a.png.1.png), names that sort between a stem's own (a.b.png between a.jpg and a.png), spaces,
# unicode, a name that is not UTF-8, and files and folders that are not inputs.
NAMES = [
    "a.jpg",
    "a.png",
    "a.png.png",
    "a.b.png",
    "b.PNG",
    "b.webp",
    "c d.jpg",
    "ü.png",
    "z.txt",
    "notes",
    os.fsdecode(b"\xff\xfe.png"),
    "0.png",
]


def build_tree(root: Path) -> None:
    for name in NAMES:
        (root / name).write_bytes(b"x")
    (root / "sub").mkdir()
    for name in ("k.png", "k.jpg", "j.png", "readme.md"):
        (root / "sub" / name).write_bytes(b"x")
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "deeper" / "m.tif").write_bytes(b"x")
    (root / "empty").mkdir()
    (root / "folder.png").mkdir()  # a folder named like an image: walked, not an input
    os.symlink(root / "nowhere.jpg", root / "gone.jpg")  # a broken link named like an image: an input
    os.symlink(root / "sub", root / "link.png")  # a link to a folder: neither


def listing(root: Path) -> list[tuple]:
    return [(item.source, str(item.path), item.rel, item.order) for item in scan([root])]


def open_connections(monkeypatch) -> list:
    """The SQLite connections the walk opens from now on, as a list that fills as it goes."""
    made = []
    real = sqlite3.connect

    def connect(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(data.sqlite3, "connect", connect)
    return made


def is_open(connection: sqlite3.Connection) -> bool:
    try:
        connection.execute("SELECT 1")
    except sqlite3.ProgrammingError:  # "Cannot operate on a closed database."
        return False
    return True


@pytest.mark.parametrize("threshold", [0, 1, 3])
def test_a_large_folder_listed_on_disk_walks_exactly_as_in_memory(tmp_path, monkeypatch, threshold):
    """Above LISTED_IN_MEMORY entries a folder is listed through SQLite on disk, so that memory does not grow
    with it; the walk is the same, item for item: order, paths and output names with every kind of clash."""
    root = tmp_path / "src"
    root.mkdir()
    build_tree(root)
    in_memory = listing(root)
    outputs = {rel for _, _, rel, _ in in_memory}
    assert {"a.jpg.png", "a.png.png", "a.png.1.png"} <= outputs and "a.png" not in outputs
    assert {"sub/k.png.png", "sub/k.jpg.png", "sub/j.png", "sub/deeper/m.png"} <= outputs
    assert "gone.png" in outputs and not any(rel.startswith(("link.png", "empty", "notes")) for rel in outputs)

    monkeypatch.setattr(data, "LISTED_IN_MEMORY", threshold)
    made = open_connections(monkeypatch)
    assert listing(root) == in_memory
    assert len(made) == (3 if threshold == 0 else 2)  # the folders above it: 17, 5 and 1 entries
    assert not any(map(is_open, made))  # each closed, and with it its database gone


def test_a_walk_stopped_early_removes_its_listing(tmp_path, monkeypatch):
    root = tmp_path / "src"
    root.mkdir()
    build_tree(root)
    monkeypatch.setattr(data, "LISTED_IN_MEMORY", 2)
    made = open_connections(monkeypatch)
    walk = scan([root])
    first = next(walk)
    assert first.rel == "0.png" and len(made) == 1 and is_open(made[0])
    walk.close()  # as a --fail-fast run stops
    assert not is_open(made[0])


def test_an_unreadable_large_folder_is_reported_and_skipped(tmp_path, monkeypatch):
    root = tmp_path / "src"
    (root / "locked").mkdir(parents=True)
    (root / "ok.png").write_bytes(b"x")
    monkeypatch.setattr(data, "LISTED_IN_MEMORY", 0)

    def refuse(path):
        if isinstance(path, (str, os.PathLike)) and Path(path).name == "locked":  # (rmtree passes descriptors)
            raise PermissionError(13, "Permission denied")
        return real(path)

    real = os.scandir
    monkeypatch.setattr(data.os, "scandir", refuse)
    said = []
    assert [item.rel for item in scan([root], on_skip=said.append)] == ["ok.png"]
    assert said == [f"{root / 'locked'}: cannot read folder (Permission denied)"]


def test_a_forked_child_leaves_its_parents_listing_alone(tmp_path, monkeypatch):
    """A DataLoader worker forked while the main process walks a large folder holds a copy of that listing;
    the child's teardown leaves the parent's connection alone (SQLite's rule for connections across a fork),
    and the parent reads its listing to the end."""
    root = tmp_path / "src"
    root.mkdir()
    build_tree(root)
    monkeypatch.setattr(data, "LISTED_IN_MEMORY", 2)
    expected = listing(root)
    made = open_connections(monkeypatch)
    walk = scan([root])
    first = next(walk)
    pid = os.fork()
    if pid == 0:  # the child: close every listing it inherited, then leave without the parent's teardown
        try:
            walk.close()
        finally:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    rest = list(walk)
    assert [(i.source, str(i.path), i.rel, i.order) for i in [first, *rest]] == expected
    assert len(made) == 2 and not any(map(is_open, made))


def test_a_large_folder_that_cannot_be_listed_on_disk_is_reported(tmp_path, monkeypatch):
    """The temporary database can fail (its disk full): the folder is reported as one that cannot be listed,
    like an unreadable one, rather than the walk ending in a traceback."""
    root = tmp_path / "src"
    (root / "big").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (root / "big" / name).write_bytes(b"x")
    (root / "ok.png").write_bytes(b"x")
    monkeypatch.setattr(data, "LISTED_IN_MEMORY", 2)

    class Full:
        def execute(self, sql, *args):
            if sql.startswith("CREATE INDEX"):
                raise sqlite3.OperationalError("database or disk is full")

        executemany = execute

        def close(self):
            pass

    monkeypatch.setattr(data.sqlite3, "connect", lambda *args, **kwargs: Full())
    said = []
    assert [item.rel for item in scan([root], on_skip=said.append)] == ["ok.png"]
    assert said == [f"{root / 'big'}: cannot list folder (database or disk is full)"]
