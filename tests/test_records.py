import json
import random

import pytest

from kmgpu import records
from kmgpu.records import read_manifest, sorted_records


def write_manifest(path, rows, torn_tail=True):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if torn_tail:
            f.write('{"output": "torn", "sr')  # a killed run's last line


def shuffled_rows(seed: int, n: int) -> list[dict]:
    """Records with repeated keys (an image done twice) in no order, each line told apart by ``seq``."""
    rng = random.Random(seed)
    return [{"output": f"d{rng.randrange(5)}/{rng.randrange(n // 3 + 1)}.png", "seq": i} for i in range(n)]


def by_output(record: dict) -> tuple:
    return tuple(record["output"].split("/"))


@pytest.mark.parametrize("chunk, most_spills", [(50_000, 64), (7, 64), (3, 2)])
@pytest.mark.parametrize("seed", range(3))
def test_sorted_records_sort_stably_whatever_the_runs_on_disk(tmp_path, monkeypatch, seed, chunk, most_spills):
    """In memory, in runs spilled to disk, and with runs merged early: the order of a stable sort."""
    monkeypatch.setattr(records, "SORT_CHUNK", chunk)
    monkeypatch.setattr(records, "_MAX_SPILLS", most_spills)
    manifest = tmp_path / "manifest.jsonl"
    rows = shuffled_rows(seed, 60)
    write_manifest(manifest, rows)
    assert list(sorted_records(manifest, by_output)) == sorted(rows, key=by_output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]  # no spill file left
    assert len(list(read_manifest(manifest))) == 60  # the manifest itself untouched


def test_spills_are_removed_when_the_reader_stops_early(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "SORT_CHUNK", 4)
    manifest = tmp_path / "manifest.jsonl"
    write_manifest(manifest, shuffled_rows(0, 30))
    reader = sorted_records(manifest, by_output)
    next(reader)
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 8  # 30 records in runs of 4
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]


def test_a_manifest_in_order_is_read_as_it_is(tmp_path, monkeypatch):
    """One run interrupted once leaves its manifest in order: nothing to sort, nothing spilled."""
    monkeypatch.setattr(records, "SORT_CHUNK", 3)
    manifest = tmp_path / "manifest.jsonl"
    rows = sorted(shuffled_rows(1, 30), key=by_output)  # equal keys included, in file order
    write_manifest(manifest, rows)
    assert records.in_order(manifest, by_output) and not records.in_order(manifest, by_output, strict=True)
    reader = sorted_records(manifest, by_output)
    assert next(reader) == rows[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.jsonl"]
    assert [next(reader)] + list(reader) == rows[1:]
    write_manifest(manifest, rows[::-1])
    assert not records.in_order(manifest, by_output)
    unique = {r["output"]: r for r in rows}.values()
    write_manifest(manifest, list(unique))
    assert records.in_order(manifest, by_output, strict=True)
