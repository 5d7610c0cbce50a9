"""The index folder shared by a build, an update and readers, on its storage functions directly (no Spark): the
manifest's compare-and-swap, names confined to the folder, checksums, and retired files' grace period."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from image_embeddings.core.vectors import unit_rows
from image_embeddings.search.index import commit_base, commit_update, load_index
from image_embeddings.search.kinds import _deserialize, _ids_table, _serialize, new_index, vector_ids
from image_embeddings.search.manifest import MANIFEST, ManifestRead, read_manifest, read_state
from image_embeddings.search.store import IndexDamagedError, ManifestChangedError, Store, UnsafeIndexNameError

DIM = 8


def _vectors(rows: int, seed: int) -> np.ndarray:
    return unit_rows(np.random.default_rng(seed).normal(size=(rows, DIM)))


def _base(store: Store, version: int, rows: int = 40, seed: int = 0, read: ManifestRead | None = None,
          grace_s: float | None = None) -> Any:
    """Commit an exact base of ``rows`` random vectors (img0, img1, ...) the way a build does."""
    index = new_index("flat", DIM, 1)
    vectors = _vectors(rows, seed)
    index.train(vectors)
    trained = _serialize(index)
    names = [f"img{i}" for i in range(rows)]
    ids = vector_ids(names)
    index.add_with_ids(vectors, ids)
    table = _ids_table(ids, names, [f"sha{i}" for i in range(rows)], "add")
    return commit_base(store, read if read is not None else read_state(store), "m-1", "/t/embeddings", version,
                       trained, index, table, kind="flat", nlist=1, grace_s=grace_s)[0]


def _update(store: Store, read: ManifestRead, version: int, changed: str, grace_s: float | None = None) -> Any:
    """Commit a segment that gives image ``changed`` a new vector, the way an update does."""
    assert read.manifest is not None
    delta = _deserialize(store.read(read.manifest.trained) or b"")
    ids = vector_ids([changed])
    delta.add_with_ids(_vectors(1, 99), ids)
    return commit_update(store, read, version, [changed], 1, delta, _ids_table(ids, [changed], ["new"], "add"),
                         grace_s)[0]


def _files(store: Store) -> dict[str, bytes]:
    return {n: store.read(n) or b"" for n in store.names()}


def _named(manifest: Any) -> set[str]:
    return {manifest.trained} | {f"{s['name']}{x}" for s in manifest.segments for x in (".faiss", ".ids.parquet")}


def _check_race(make: Callable[[str], Store]) -> None:
    store = make("m-1")
    _base(store, 0)
    update_read = read_state(store)  # an update reads manifest M1 ...
    m2 = _base(store, 1)  # ... a build replaces it with M2 (M1's files retired, kept for the grace period) ...
    before = _files(store)
    with pytest.raises(ManifestChangedError, match=r"another writer replaced the index manifest .* run again"):
        _update(store, update_read, 2, "img3", grace_s=0)  # ... then the update tries to write
    assert _files(store) == before, "M2 stays, every file it names is whole, the update's own files are gone"
    assert read_manifest(store) == m2 and _named(m2) <= set(before)
    loaded = load_index(store, 1)
    assert loaded.manifest.version == 1 and loaded.index.ntotal == 40

    # Two first builds that both saw no manifest: the second fails the same way (put if none exists).
    empty = make("m-2")
    first, second = read_state(empty), read_state(empty)
    _base(empty, 0, read=first)
    with pytest.raises(ManifestChangedError):
        _base(empty, 0, seed=1, read=second)
    assert len(empty.names()) == 4 and load_index(empty, 1).manifest == read_manifest(empty)


def test_an_update_that_read_a_replaced_manifest_fails_and_the_build_stays(tmp_path: Path) -> None:
    _check_race(lambda name: Store(str(tmp_path / name)))


def test_the_race_on_s3_uses_conditional_puts(s3_server: Any) -> None:
    s3_server.client().create_bucket(Bucket="race")
    _check_race(lambda name: Store(f"s3a://race/index/{name}", s3_server.endpoint, "us-east-1"))


BAD = ["../victim.bin", "ABSOLUTE", "sub/x.bin", "..\\victim.bin", "", ".hidden", "x" * 201, "a b.bin"]
PLACES = ["trained", "segment", "retired", "checksums"]


# A segment named "manifest.json" names manifest.json.faiss, a fine name: the manifest itself elsewhere.
@pytest.mark.parametrize("where,bad", [(w, b) for w in PLACES for b in BAD] +
                         [(w, "manifest.json") for w in PLACES if w != "segment"])
def test_a_manifest_naming_anything_but_a_file_in_the_folder_is_refused(tmp_path: Path, where: str,
                                                                         bad: str) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    bad = str(victim) if bad == "ABSOLUTE" else bad
    store = Store(str(tmp_path / "idx"))
    manifest = _base(store, 0)
    raw = json.loads(store.read(MANIFEST) or b"")
    if where == "trained":
        raw["trained"] = bad
    elif where == "segment":
        bad = bad.removesuffix(".bin")  # the segment's files are <name>.faiss and <name>.ids.parquet
        raw["segments"][0]["name"] = bad
    else:
        raw[where][bad] = 0.0 if where == "retired" else "0" * 64
    store.write(MANIFEST, json.dumps(raw).encode())
    for call in (lambda: read_manifest(store), lambda: load_index(store, 1)):
        with pytest.raises(UnsafeIndexNameError, match="not a plain file name|its own manifest") as info:
            call()
        assert store.location in str(info.value) and "index --full" in str(info.value)
        assert repr(bad) in str(info.value) or bad == "manifest.json"
    # A full build replaces the manifest it cannot use without touching what it names, even with no grace.
    _base(store, 1, read=read_state(store, lenient=True), grace_s=0)
    assert victim.read_bytes() == b"keep me" and load_index(store, 1).manifest.version == 1
    assert _named(manifest) <= set(store.names()), "the unusable manifest's own files are left alone too"


def test_the_store_itself_refuses_paths_and_links_out_of_the_folder(tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    store = Store(str(tmp_path / "idx"))
    store.write("a.bin", b"a")
    for call in (lambda: store.read("../victim.bin"), lambda: store.delete(["../victim.bin"]),
                 lambda: store.write(str(victim), b"overwritten")):
        with pytest.raises(UnsafeIndexNameError, match="victim.bin"):
            call()
    os.symlink(victim, tmp_path / "idx" / "link.bin")
    with pytest.raises(IndexDamagedError, match="link.bin cannot be read"):
        store.read("link.bin")
    assert victim.read_bytes() == b"keep me"


@pytest.mark.parametrize("damage", ["flip", "truncate", "replace", "ids", "missing"])
def test_a_damaged_file_is_an_error_on_load_not_a_search_result(tmp_path: Path, damage: str) -> None:
    store = Store(str(tmp_path / "idx"))
    manifest = _base(store, 0)
    name = manifest.segments[0]["name"]
    path = tmp_path / "idx" / f"{name}.faiss"
    data = bytearray(path.read_bytes())
    assert load_index(store, 1).search(_vectors(40, 0)[7], 1)[1] == [["img7"]]
    if damage == "flip":  # vector bytes near the end: faiss would read this file and answer wrongly
        data[-64:-32] = bytes(b ^ 0xFF for b in data[-64:-32])
        path.write_bytes(bytes(data))
        assert _deserialize(bytes(data)).ntotal == 40, "the flipped file still deserializes"
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "replace":  # another valid index under the same name
        other = Store(str(tmp_path / "other"))
        other_name = _base(other, 0, seed=5).segments[0]["name"]
        path.write_bytes(other.read(f"{other_name}.faiss") or b"")
    elif damage == "ids":
        ids_path = tmp_path / "idx" / f"{name}.ids.parquet"
        ids_path.write_bytes(ids_path.read_bytes()[:-1] + b"!")
    else:
        path.unlink()
    with pytest.raises(IndexDamagedError, match=r"is damaged: .*rebuild it with `image-embeddings index --full`"):
        load_index(store, 1)


def test_a_manifest_of_the_previous_release_loads_unverified(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "idx"))
    _base(store, 0)
    raw = json.loads(store.read(MANIFEST) or b"")
    for key in ("checksums", "retired"):
        del raw[key]
    raw["format"] = 1
    store.write(MANIFEST, json.dumps(raw).encode())
    loaded = load_index(store, 1)
    assert loaded.manifest.checksums == {} and loaded.search(_vectors(40, 0)[9], 1)[1] == [["img9"]]
    # An update on it records checksums of its own files; the base stays unverified until a rebuild.
    updated = _update(store, read_state(store), 1, "img3")
    assert updated.format == 2 and len(updated.checksums) == 2 and load_index(store, 1).index.ntotal == 40


def test_retired_files_are_deleted_only_after_the_grace_period(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "idx"))
    old = _named(_base(store, 0))
    current = _base(store, 1, grace_s=3600)  # a rebuild: the old base is retired, not deleted
    assert old <= set(store.names()) and set(current.retired) == old
    current = _update(store, read_state(store), 2, "img5", grace_s=3600)  # a later write inside the grace period
    assert old <= set(store.names()) and set(current.retired) == old
    time.sleep(0.3)
    newest = _base(store, 3, grace_s=0.2)  # past it for the old base; the base just retired has its 0.2 s
    assert not old & set(store.names()) and not old & set(newest.retired)
    assert set(newest.retired) == _named(current) <= set(store.names())
    assert _named(newest) <= set(store.names()) and load_index(store, 1).manifest.version == 3
    _base(store, 4, grace_s=0)
    assert set(store.names()) == _named(read_manifest(store)) | {MANIFEST}, "no file the manifest names is gone"
