"""The image store: made once per folder, rebuilt when a source changes, shared safely, read on access."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image
from store_worker import NAMES, open_and_save
from test_coco import make_coco

from fedmml.config import load_config
from fedmml.data import DataError
from fedmml.data.coco import CaptionDataset
from fedmml.data.images import UnreadableImage, load_image
from fedmml.data.store import Geometry, ImagesConfig, open_images, open_store, read_or_next
from fedmml.experiment import run_experiment


def _photo(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for i in range(4):
        _photo(i).save(images / f"{i}.jpg", quality=92)
    Image.new("RGBA", (50, 40), (10, 200, 30, 128)).save(images / "emoji.png")
    (images / "broken.jpg").write_bytes((images / "0.jpg").read_bytes()[:300])
    return images


def _shards(images: Path, geometry: Geometry) -> list[Path]:
    return sorted((images.parent / ".fedmml-store" / geometry.name).glob("*.json"))


def test_a_store_holds_what_training_reads_and_is_made_once(folder: Path) -> None:
    geometry = Geometry(32, augment=True)
    store = open_store(folder, NAMES, geometry, folder.parent / ".fedmml-store")
    assert len(_shards(folder, geometry)) == 1
    # PNG sources are kept losslessly: exactly the pixels the source decodes to, fitted.
    assert np.array_equal(store.read("emoji.png"), geometry.fit(load_image(folder / "emoji.png")))
    # JPEGs are kept at the short side crops need (32 / sqrt(0.5) -> 46), re-encoded at quality 95.
    stored = store.read("1.jpg")
    assert stored.shape == (46, 61, 3)
    want = geometry.fit(load_image(folder / "1.jpg")).astype(int)
    assert np.abs(stored.astype(int) - want).mean() < 4
    assert "cannot read image" in store.unreadable("broken.jpg")
    with pytest.raises(UnreadableImage):
        store.read("broken.jpg")
    again = open_store(folder, NAMES, geometry, folder.parent / ".fedmml-store")
    assert len(_shards(folder, geometry)) == 1 and np.array_equal(again.read("1.jpg"), stored)
    # Without augmentation an image is kept as training uses it: size x size.
    assert open_store(folder, NAMES[:1], Geometry(16, False), folder.parent / ".s").read("0.jpg").shape == (
        16,
        16,
        3,
    )


def test_a_changed_source_is_prepared_again_never_served_stale(folder: Path) -> None:
    geometry = Geometry(16, augment=False)
    before = open_store(folder, NAMES, geometry, folder.parent / ".fedmml-store").read("2.jpg")
    _photo(99).save(folder / "2.jpg", quality=92)
    after = open_store(folder, NAMES, geometry, folder.parent / ".fedmml-store")
    assert len(_shards(folder, geometry)) == 2  # only the changed image went into the new shard
    assert not np.array_equal(after.read("2.jpg"), before)
    assert np.array_equal(
        after.read("2.jpg"), open_store(folder, ["2.jpg"], geometry, folder.parent / "x").read("2.jpg")
    )


def test_an_unchanged_store_is_not_gathered_again_and_a_new_shard_is_seen(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedmml.data.store as store_module

    read: list[Path] = []
    entries = store_module._index_entries
    monkeypatch.setattr(store_module, "_index_entries", lambda index: read.append(index) or entries(index))
    geometry = Geometry(16, False)
    first = open_images(folder, ["0.jpg", "1.jpg"], geometry)
    read.clear()
    again = open_images(folder, ["1.jpg"], geometry)  # the next client of the same simulation
    assert read == []
    assert np.array_equal(again.read("1.jpg"), first.read("1.jpg"))
    # A shard made by another process (which leaves this one's gathered entries as they were) is found
    # without the lock that building would take.
    key = ("2.jpg", *store_module.source_key(folder / "2.jpg"))
    store_module._build_shard(store_module.as_sources(folder), first.directory, [key], geometry, 0)
    monkeypatch.setattr(store_module, "FileLock", None)  # taking it would fail
    both = open_images(folder, ["0.jpg", "2.jpg"], geometry)
    assert both.read("2.jpg").shape == (16, 16, 3)


def test_a_truncated_shard_is_made_again_and_a_killed_builds_leftovers_are_removed(folder: Path) -> None:
    geometry = Geometry(16, augment=False)
    store_dir = folder.parent / ".fedmml-store"
    want = open_store(folder, NAMES, geometry, store_dir).read("2.jpg")
    [index] = _shards(folder, geometry)
    blob = index.with_suffix(".bin")
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 3])  # a full disk, a copy cut short
    orphan = index.parent / "0123456789abcdef.bin"  # a build killed before its index was written
    orphan.write_bytes(b"")
    again = open_store(folder, NAMES, geometry, store_dir)
    assert np.array_equal(again.read("2.jpg"), want) and all(again.read(n) is not None for n in NAMES[:4])
    assert not blob.exists() and not orphan.exists() and len(_shards(folder, geometry)) == 1


def test_two_processes_opening_one_store_at_once_make_it_once(folder: Path, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    outs = [str(tmp_path / f"{n}.npy") for n in range(2)]
    procs = [context.Process(target=open_and_save, args=(str(folder), out)) for out in outs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        assert proc.exitcode == 0
    assert len(_shards(folder, Geometry(24, True))) == 1
    assert np.array_equal(np.load(outs[0]), np.load(outs[1]))


def test_hard_links_are_stored_once(folder: Path) -> None:
    for n in range(3):
        os.link(folder / "0.jpg", folder / f"link{n}.jpg")
    names = ["0.jpg", "link0.jpg", "link1.jpg", "link2.jpg"]
    store = open_store(folder, names, Geometry(16, False), folder.parent / ".fedmml-store")
    assert len({store.entries[n][1] for n in names}) == 1  # one offset
    assert all(np.array_equal(store.read(n), store.read("0.jpg")) for n in names)


def test_a_full_disk_is_one_line_naming_the_store_and_the_space(folder: Path, monkeypatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(
        DataError, match=r"no space left for the image store .*square16: it needs about"
    ) as err:
        open_store(folder, NAMES, Geometry(16, False), folder.parent / ".fedmml-store")
    assert "\n" not in str(err.value)
    assert not list((folder.parent / ".fedmml-store" / "square16").glob("*.bin"))  # nothing half-written kept


def test_an_unwritable_store_folder_is_one_line(folder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError, match="cannot create the image store .*data.store_dir"):
        open_images(folder, NAMES, Geometry(16, False), ImagesConfig(store_dir=blocker / "sub"))


def test_a_data_folder_that_cannot_be_written_keeps_its_store_in_the_cache(
    folder: Path, tmp_path: Path, monkeypatch
) -> None:
    # Root writes anywhere, so the read-only folder (a shared data set, a mount) is what os.access reports.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path).parent != folder.parent)
    store = open_images(folder, NAMES, Geometry(32, False))
    assert store.directory.is_relative_to(tmp_path / "cache" / "fedmml" / "stores")
    assert not any((folder.parent / ".fedmml-store").iterdir())  # nothing written beside the data
    assert read_or_next(store, NAMES, 0)[1].size  # and it serves the images


def test_an_image_that_fails_at_access_is_passed_over_and_counted(folder: Path) -> None:
    store = open_store(folder, NAMES[:4], Geometry(16, False), folder.parent / ".fedmml-store")
    shard, offset, length, *_ = store.entries["1.jpg"]
    blob = store.directory / f"{shard}.bin"
    data = bytearray(blob.read_bytes())
    data[offset : offset + length] = b"\0" * length  # damaged after it was made
    blob.write_bytes(bytes(data))
    reread = open_store(folder, NAMES[:4], Geometry(16, False), folder.parent / ".fedmml-store")
    position, pixels, missed = read_or_next(reread, NAMES[:4], 1)
    assert (position, missed) == (2, 1) and np.array_equal(pixels, reread.read("2.jpg"))
    # The same through a dataset without a store: a source that breaks after opening.
    root = make_coco(folder.parent.parent / "coco")
    ds = CaptionDataset(root, "train", image_size=8, images=ImagesConfig(store=False))
    (root / "images" / "1.png").write_bytes(b"not an image")
    first = ds.file_names.index("1.png")
    (pixels, caption), missed = ds.take(first, epoch=0)
    assert missed == 1 and caption in ds.captions[first + 1]


def test_decoding_a_stored_jpeg_is_simplejpeg(folder: Path) -> None:
    store = open_store(folder, ["0.jpg"], Geometry(16, False), folder.parent / ".fedmml-store")
    shard, offset, length, *_ = store.entries["0.jpg"]
    data = (store.directory / f"{shard}.bin").read_bytes()[offset : offset + length]
    assert simplejpeg.is_jpeg(data)


@pytest.mark.slow  # two short training runs
def test_a_broken_image_is_counted_where_it_is_found_and_training_goes_on(
    emoji_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "emoji"
    shutil.copytree(emoji_root, root, ignore=shutil.ignore_patterns(".fedmml-store", ".cache"))
    train = json.loads((root / "captions_train.json").read_text())
    for record in train["images"][::20]:  # enough that tiny's training subset holds some
        broken = root / "images" / record["file_name"]
        broken.write_bytes(broken.read_bytes()[:100])
    overrides = [
        f'data.root="{root}"',
        'run.method="lw"',
        "run.threads=1",
        "schedules.uniform.rounds=[1, 0, 0]",
    ]
    # With a store they are found while the store is made, before training.
    stored = run_experiment(load_config("tiny", overrides), tmp_path / "stored")
    found = stored["skipped"]["train"]["unreadable_image"]
    assert found >= 1
    assert stored["skipped"]["train"]["unreadable_at_access"] == 0
    # Read from the sources, each is found when a batch reaches it: passed over, counted, training goes on.
    direct = run_experiment(load_config("tiny", [*overrides, "data.store=false"]), tmp_path / "direct")
    assert direct["skipped"]["train"]["unreadable_image"] == 0
    assert direct["skipped"]["train"]["unreadable_at_access"] >= 1
    assert direct["rsum"] > 0
