"""Data as people have it: MS-COCO 2017, Karpathy splits (COCO, Flickr30k), and formats users register,
each read in place from folders built by hand with the real files' keys and nesting."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmml.api import load_config, run
from fedmml.cli import main
from fedmml.config import Config
from fedmml.data import DataError
from fedmml.data.coco import CaptionIndex
from fedmml.data.formats import FORMATS, detect_format, register_format
from fedmml.tasks import task_for

WORDS = ["red", "green", "blue", "small", "large", "round", "square", "dog", "cat", "car", "tree", "house"]


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((64, 48)).save(path, quality=90)


def _caption(i: int, k: int) -> str:
    return f"a {WORDS[i % 12]} {WORDS[(i + k) % 12]} {WORDS[(3 * i + k) % 12]}"


def coco2017(root: Path, train: int = 24, val: int = 8) -> Path:
    """The official release's shape: annotations/captions_{train,val}2017.json, train2017/, val2017/."""
    for split, count, first in (("train2017", train, 9), ("val2017", val, 139)):
        images, annotations = [], []
        for n in range(count):
            image_id = first + 7 * n
            name = f"{image_id:012d}.jpg"
            _jpeg(root / split / name, image_id)
            images.append(
                {
                    "license": 1,
                    "file_name": name,
                    "coco_url": f"http://images.cocodataset.org/{split}/{name}",
                    "height": 48,
                    "width": 64,
                    "date_captured": "2013-11-14 11:18:45",
                    "flickr_url": "http://farm1.staticflickr.com/1/1.jpg",
                    "id": image_id,
                }
            )
            annotations += [
                {"image_id": image_id, "id": 10 * image_id + k, "caption": _caption(image_id, k)}
                for k in range(5)
            ]
        data = {"info": {"year": 2017}, "licenses": [], "images": images, "annotations": annotations}
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return root


def karpathy(root: Path, dataset: str, splits: dict[str, int]) -> Path:
    """A Karpathy splits file: COCO's with filepath + filename and cocoid, Flickr30k's with filename only
    (images in flickr30k-images/)."""
    images, imgid, sentid = [], 0, 0
    for split, count in splits.items():
        for _ in range(count):
            sentences = []
            for k in range(5):
                raw = _caption(imgid, k)
                sentences.append({"tokens": raw.split(), "raw": raw, "imgid": imgid, "sentid": sentid})
                sentid += 1
            entry = {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences}
            if dataset == "coco":
                cocoid = 391895 + 13 * imgid
                folder = "val2014" if split in ("val", "test", "restval") else "train2014"
                entry |= {
                    "filepath": folder,
                    "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                    "cocoid": cocoid,
                }
                _jpeg(root / folder / entry["filename"], imgid)
            else:
                entry["filename"] = f"{1000092795 + imgid}.jpg"
                _jpeg(root / "flickr30k-images" / entry["filename"], imgid)
            images.append({**entry, "split": split})
            imgid += 1
    root.mkdir(parents=True, exist_ok=True)
    (root / f"dataset_{dataset}.json").write_text(json.dumps({"images": images, "dataset": dataset}))
    return root


def _cfg(root: Path, *extra: str) -> Config:
    overrides = [
        f'data.root="{root}"',
        "data.limit_train=0",
        "data.limit_test=0",
        "federation.num_clients=2",
        "federation.batch_size=4",
        "schedules.uniform.rounds=[1, 1, 0]",
        "run.threads=1",
        *extra,
    ]
    return load_config("tiny", overrides)


def _sizes(cfg: Config) -> dict[str, int]:
    task = task_for(cfg)
    return {split: len(task.read_index(cfg, cfg.data.root, split, 0)) for split in ("train", "test")}


def test_each_shape_is_found_by_its_files(tmp_path: Path, emoji_root: Path) -> None:
    assert detect_format(coco2017(tmp_path / "c17", 4, 4)).name == "coco2017"
    assert detect_format(karpathy(tmp_path / "kc", "coco", {"train": 2, "test": 2})).name == "karpathy"
    assert detect_format(karpathy(tmp_path / "kf", "flickr30k", {"train": 2, "test": 2})).name == "karpathy"
    assert detect_format(emoji_root).name == "coco"
    assert detect_format(tmp_path) is None


def test_coco2017_reads_train2017_and_scores_on_val2017(tmp_path: Path) -> None:
    root = coco2017(tmp_path / "coco")
    cfg = _cfg(root)
    assert _sizes(cfg) == {"train": 24, "test": 8}
    test = task_for(cfg).load_split(cfg, "test", train=False)
    assert len(test.captions[0]) == 5 and test.image_ids[0] == 139
    # No copy, no preparation: the store is the only thing written, beside the data.
    assert {p.name for p in root.iterdir()} == {"annotations", "train2017", "val2017", ".fedmml-store"}
    with pytest.raises(DataError, match="splits train, test"):
        task_for(cfg).read_index(cfg, str(root), "val", 0)
    # eval.split = "val" carves a validation split out of train2017, as for any folder without one.
    val = _cfg(root, 'eval.split="val"', "data.val_fraction=0.25")
    _, held = task_for(val).held_out(val, str(root))
    assert 0 < len(held) < 24 and set(held.image_ids) <= {9 + 7 * n for n in range(24)}


def test_karpathy_splits_and_restval(tmp_path: Path) -> None:
    root = karpathy(tmp_path / "coco", "coco", {"train": 16, "restval": 8, "val": 4, "test": 6})
    assert _sizes(_cfg(root)) == {"train": 16, "test": 6}
    assert _sizes(_cfg(root, "data.restval=true"))["train"] == 24
    cfg = _cfg(root, 'eval.split="val"')
    split, held = task_for(cfg).held_out(cfg, str(root))
    assert split == "val" and len(held) == 4  # the file's own val split, not a carve
    index = task_for(cfg).read_index(cfg, str(root), "test", 0)
    assert index.file_names[0].startswith("val2014/COCO_val2014_") and len(index.captions[0]) == 5
    assert index.identities[0] == f"id={index.image_ids[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["coco2017", "karpathy-flickr30k", "hf"])
def test_a_folder_of_each_shape_trains_and_scores_as_it_is(shape: str, tmp_path: Path) -> None:
    extra = []
    if shape == "coco2017":
        root = coco2017(tmp_path / "data")
    elif shape == "hf":
        root, extra = hf_dataset(tmp_path / "data", coco2017(tmp_path / "coco"), "parquet"), HF
    else:
        root = karpathy(tmp_path / "data", "flickr30k", {"train": 24, "val": 4, "test": 8})
    summary = run(_cfg(root, *extra), tmp_path / "run")
    assert summary["train_images"] == 24 and summary["test_images"] == 8
    assert 0 <= summary["rsum"] <= 600


def _csv_read(root: Path, split: str, cfg: Config) -> CaptionIndex:
    """A user's own layout: <split>.csv with image,caption rows, the images beside it."""
    rows = list(csv.DictReader((root / f"{split}.csv").open()))
    names = sorted({r["image"] for r in rows})
    captions = {n: [r["caption"] for r in rows if r["image"] == n] for n in names}
    index = CaptionIndex(
        root / f"{split}.csv", root, names, names, [captions[n] for n in names], [None] * len(names), {}
    )
    index.identities = [f"id={n}" for n in names]
    return index


def test_a_registered_format_trains_with_one_function(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    root.mkdir()
    for split, count in (("train", 24), ("test", 8)):
        rows = [["image", "caption"]]
        for n in range(count):
            _jpeg(root / f"{split}-{n}.jpg", n)
            rows += [[f"{split}-{n}.jpg", _caption(n, k)] for k in range(2)]
        with (root / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    splits = lambda root, cfg: sorted(p.stem for p in root.glob("*.csv"))  # noqa: E731
    register_format("csv", "image-text", _csv_read, splits, lambda root: any(root.glob("*.csv")))
    try:
        cfg = _cfg(root, 'data.format="csv"')
        assert _sizes(cfg) == {"train": 24, "test": 8}
        assert detect_format(root).name == "csv"
        with pytest.raises(ValueError, match="built in"):
            register_format("coco", "image-text", _csv_read, splits)
    finally:
        FORMATS.pop("csv", None)


def test_a_wrong_format_is_one_line(tmp_path: Path) -> None:
    root = coco2017(tmp_path / "coco", 4, 4)
    with pytest.raises(DataError, match="unknown data.format 'nope'"):
        _sizes(_cfg(root, 'data.format="nope"'))
    with pytest.raises(DataError, match="holds image-audio data"):
        _sizes(_cfg(root, 'data.format="advance"'))


def test_data_check_names_the_format_the_splits_and_what_is_missing(tmp_path: Path, capsys) -> None:
    root = karpathy(tmp_path / "coco", "coco", {"train": 10, "restval": 4, "val": 3, "test": 5})
    gone = next((root / "val2014").iterdir())
    gone.unlink()
    broken = next((root / "train2014").iterdir())
    broken.write_bytes(b"not a jpeg")
    args = ["data", "check", str(root), "--set", "data.limit_train=0", "--set", "data.restval=true"]
    assert main([*args, "--json", "--decode"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "karpathy" and report["task"] == "image-text"
    splits = report["splits"]
    assert {name: s["samples"] for name, s in splits.items()} == {"train": 14, "val": 3, "test": 5}
    assert splits["train"]["captions_per_image"] == {"min": 5, "mean": 5.0, "max": 5}
    assert sum(s["missing_files"] for s in splits.values()) == 1
    assert (
        splits["train"]["undecodable_files"] == 1 and str(broken) in splits["train"]["undecodable_examples"]
    )
    assert report["run"]["train_samples"] == 14 and report["run"]["train_split"] == "train"
    # The screen form says the same in one table.
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "karpathy" in shown and "restval" not in shown.split("\n", 1)[1].split("a run of")[0].split("│")[1]
    assert "trains on 14 samples of train" in " ".join(shown.split())


def test_the_synthetic_coco_folder_reads_the_same_in_every_layout(tmp_path: Path) -> None:
    from fedmml.data.synthetic import write_folder

    indexes = {}
    for layout in ("coco", "coco2017", "hf"):
        root = write_folder(tmp_path / layout, 6, 3, workers=1, layout=layout)
        cfg = _cfg(root, *(["data.id_column=image_id"] if layout == "hf" else []))
        assert detect_format(root).name == layout
        indexes[layout] = [task_for(cfg).read_index(cfg, str(root), s, 0) for s in ("train", "test")]
    for ours, official, hub in zip(indexes["coco"], indexes["coco2017"], indexes["hf"], strict=True):
        assert (ours.image_ids, ours.captions) == (official.image_ids, official.captions)
        assert (hub.image_ids, hub.captions) == (ours.image_ids, ours.captions)
        assert all((official.images_path / name).is_file() for name in official.file_names)
        first = hub.file_names[0]
        assert hub.sources.encoded(first) == (ours.images_path / ours.file_names[0]).read_bytes()


def hf_dataset(root: Path, source: Path, shape: str) -> Path:
    """The coco2017 folder ``source`` as a Hugging Face dataset on disk: one row per image with the image's
    JPEG bytes (``datasets.Image``), its five captions, its COCO id and a ClassLabel; ``save_to_disk``'s
    folder, or Parquet files in the Hub's layout (train in two files)."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "sentences": datasets.Sequence(datasets.Value("string")),
            "cocoid": datasets.Value("int64"),
            "kind": datasets.ClassLabel(names=["odd", "even"]),
        }
    )
    splits = {}
    for split, name in (("train", "train2017"), ("test", "val2017")):
        data = json.loads((source / "annotations" / f"captions_{name}.json").read_text())
        rows: dict[str, list] = {"image": [], "sentences": [], "cocoid": [], "kind": []}
        for image in data["images"]:
            path = source / name / image["file_name"]
            rows["image"].append({"bytes": path.read_bytes(), "path": None})
            rows["sentences"].append(
                [a["caption"] for a in data["annotations"] if a["image_id"] == image["id"]]
            )
            rows["cocoid"].append(image["id"])
            rows["kind"].append(image["id"] % 2)
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    if shape == "disk":
        datasets.DatasetDict(splits).save_to_disk(str(root))
    else:
        half = len(splits["train"]) // 2
        parts = {"train-00000-of-00002": splits["train"].select(range(half))}
        parts["train-00001-of-00002"] = splits["train"].select(range(half, len(splits["train"])))
        parts["test-00000-of-00001"] = splits["test"]
        for stem, part in parts.items():
            part.to_parquet(str(root / "data" / f"{stem}.parquet"))
    return root


HF = ['data.caption_column="sentences"', 'data.id_column="cocoid"', 'data.label_column="kind"']


@pytest.mark.parametrize("shape", ["disk", "parquet"])
def test_a_hugging_face_dataset_on_disk_reads_as_the_folder_it_was_made_from(
    shape: str, tmp_path: Path
) -> None:
    source = coco2017(tmp_path / "coco", 12, 4)
    root = hf_dataset(tmp_path / "hf", source, shape)
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert detect_format(root).name == "hf"
    cfg, official = _cfg(root, *HF), _cfg(source)
    assert _sizes(cfg) == {"train": 12, "test": 4}
    for split in ("train", "test"):
        ours = task_for(cfg).load_split(cfg, split, train=False)
        theirs = task_for(official).load_split(official, split, train=False)
        assert (ours.image_ids, ours.captions) == (theirs.image_ids, theirs.captions)
        assert all(ours[i][0].equal(theirs[i][0]) for i in range(len(ours)))  # the same pixels
    index = task_for(cfg).read_index(cfg, str(root), "train", 0)
    assert set(index.labels) == {"odd", "even"}  # the ClassLabel's names, for Dirichlet splits
    # In place: the image store is the only thing written.
    assert sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if ".fedmml-store" not in p.parts
    ) == [*written]
    # Without the store, each access decodes its row as the official folder's file.
    direct, files = _cfg(root, *HF, "data.store=false"), _cfg(source, "data.store=false")
    unstored = task_for(direct).load_split(direct, "test", train=False)
    assert unstored[3][0].equal(task_for(files).load_split(files, "test", train=False)[3][0])


def test_a_hugging_face_dataset_counts_bad_rows_and_names_missing_columns(tmp_path: Path, capsys) -> None:
    import datasets

    root = tmp_path / "hf"
    good = next((coco2017(tmp_path / "coco", 4, 1) / "train2017").iterdir()).read_bytes()
    rows = {
        "image": [
            {"bytes": good, "path": None},
            None,
            {"bytes": b"not a jpeg", "path": None},
            {"bytes": good},
        ],
        "caption": ["a red dog", "a blue cat", "a green car", "  "],
    }
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "train.parquet"))
    cfg = _cfg(root)  # caption found by its usual name; ids are row positions
    index = task_for(cfg).read_index(cfg, str(root), "train", 0)
    assert index.image_ids == [0, 1, 2] and index.skipped["image_without_caption"] == 1
    train = task_for(cfg).load_split(cfg, "train", train=True)
    assert train.skipped["unreadable_image"] == 2 and train.image_ids == [0]
    with pytest.raises(DataError, match=r"no caption column 'words' \(columns: image, caption\)"):
        _sizes(_cfg(root, 'data.caption_column="words"'))
    assert main(["data", "check", str(root), "--json", "--decode", "--set", "data.limit_train=0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "hf" and report["splits"]["train"]["undecodable_files"] == 2


@pytest.mark.parametrize("shape", ["karpathy", "hf"])
def test_node_folders_of_another_format_hold_the_simulated_shares(shape: str, tmp_path: Path) -> None:
    from fedmml.client_data import SharedSplit, local_folder
    from fedmml.node_split import split_for_nodes

    if shape == "karpathy":
        root, extra = karpathy(tmp_path / "data", "coco", {"train": 10, "restval": 4, "test": 4}), []
    else:
        root, extra = hf_dataset(tmp_path / "data", coco2017(tmp_path / "coco", 14, 4), "parquet"), HF
    cfg = _cfg(root, *extra, "data.restval=true", "federation.num_clients=3")
    written = split_for_nodes(cfg, 3, tmp_path / "split")
    shared = SharedSplit(cfg)
    for cid, node in enumerate(written["nodes"]):
        simulated, own = shared.client(cid).dataset, local_folder(cfg, cid, node["folder"]).dataset
        assert detect_format(Path(node["folder"])).name == "coco"  # fedmml's own layout
        assert (own.image_ids, own.captions, own.labels) == (
            simulated.image_ids,
            simulated.captions,
            simulated.labels,
        )
        assert own.take(0, 0)[0][0].equal(simulated.take(0, 0)[0][0])
    assert sum(node["train"] for node in written["nodes"]) == 14


def hf_av_dataset(root: Path, source: Path) -> Path:
    """The ADVANCE folder ``source`` as a Hugging Face dataset saved to disk: one row per pair with the
    image's and the sound's bytes (``datasets.Image``, ``datasets.Audio``), a ClassLabel, the sample's id and
    its language from meta.json."""
    import datasets

    from fedmml.data.advance import read_advance_index, read_classes

    classes = read_classes(source)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            # datasets.Audio's storage (encoding through it needs torchcodec, which is not installed here)
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "label": datasets.ClassLabel(names=classes),
            "sample": datasets.Value("string"),
            "language": datasets.Value("string"),
        }
    )
    splits = {}
    for split in ("train", "test"):
        index = read_advance_index(source, split, classes)
        rows: dict[str, list] = {name: [] for name in features}
        for (name, sample_id, image, sound), group in zip(index.pairs, index.groups, strict=True):
            rows["image"].append({"bytes": image.read_bytes(), "path": None})
            rows["audio"].append({"bytes": sound.read_bytes(), "path": None})
            rows["label"].append(classes.index(name))
            rows["sample"].append(sample_id)
            rows["language"].append(group)
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))
    return root


@pytest.mark.slow
def test_an_image_and_sound_dataset_on_disk_reads_and_splits_as_its_folder(
    tuxpaint_root: Path, tmp_path: Path
) -> None:
    from fedmml.client_data import SharedSplit, local_folder
    from fedmml.node_split import split_for_nodes
    from fedmml.tasks import resolve_classes

    root = hf_av_dataset(tmp_path / "hf", tuxpaint_root)
    found = detect_format(root)
    assert found.name == "hf" and found.task_of(root) == "image-audio"
    common = [
        "run.threads=1",
        "data.limit_train=0",
        "data.limit_test=0",
        "federation.num_clients=2",
        f'data.store_dir="{tmp_path / "s"}"',
    ]
    cfg = resolve_classes(load_config("tiny-av", [f'data.root="{root}"', 'data.id_column="sample"', *common]))
    official = resolve_classes(load_config("tiny-av", [f'data.root="{tuxpaint_root}"', *common]))
    assert cfg.data.classes == official.data.classes  # the ClassLabel's names, in its order
    assert _sizes(cfg) == _sizes(official)
    ours, theirs = (task_for(c).load_split(c, "test", train=False) for c in (cfg, official))
    assert (ours.ids, ours.labels, ours.groups) == (theirs.ids, theirs.labels, theirs.groups)
    for i in (0, len(ours) - 1):  # the same pixels and the same filterbank frames
        assert all(
            a.equal(b) if hasattr(a, "equal") else a == b for a, b in zip(ours[i], theirs[i], strict=True)
        )
    # Node folders in the ADVANCE layout hold the simulated shares, languages kept for group partitions.
    written = split_for_nodes(cfg, 2, tmp_path / "split")
    shared = SharedSplit(cfg)
    for cid, node in enumerate(written["nodes"]):
        own, simulated = local_folder(cfg, cid, node["folder"]).dataset, shared.client(cid).dataset
        assert detect_format(Path(node["folder"])).name == "advance"
        assert (own.ids, own.labels, own.groups) == (simulated.ids, simulated.labels, simulated.groups)
