"""`depthlab data convert`: your files -> the streaming formats of train/streaming/.

  * an image folder (one sub-folder per class; optionally train/ and test/ (or val/) folders of them)
      -> OUT/train-0000i-of-0000n.array_record, OUT/test-...: records {"image": PNG/JPEG bytes, "label": int}
  * a .npz with x_train, y_train, x_test, y_test (images [N, H, W(, C)])
      -> the same layout (uint8 images as PNG bytes; float images as float32 arrays)
  * a text file -> OUT/train.bin, OUT/val.bin (uint16 token ids, uint32 past 65,536 ids; nanoGPT's layout),
      OUT/meta.json and the tokenizer (tokenizer.json for characters, tokenizer.model for SentencePiece)

Each writes OUT/dataset.json (splits, files, records, classes, shapes) and prints a summary.

Example:
    >>> summary = convert("photos/", "data/photos", shards=8, size=(64, 64))
    >>> summary["records"], summary["classes"][:2]          # (12000, ['cat', 'dog'])
    depthlab run vision/mnist_resnet --config.data.source=arrayrecord:data/photos/train-*.array_record
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from depthlab.train.streaming import DataSourceError, encode_record, require

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "test", "validation": "test"}


def shard_paths(out_dir: str, split: str, shards: int) -> list[str]:
    return [os.path.join(out_dir, f"{split}-{i:05d}-of-{shards:05d}.array_record") for i in range(shards)]


def write_arrayrecord(records: Iterable[dict], count: int, out_dir: str, split: str, shards: int = 1,
                      progress: bool = True) -> list[str]:
    """Writes `count` feature dicts as `shards` ArrayRecord files (consecutive records per file, group size 1
    for random access). Returns the paths."""
    ArrayRecordWriter = require("array_record.python.array_record_module", "stream",
                                "depthlab data convert").ArrayRecordWriter

    shards = max(1, min(int(shards), int(count)))
    if count <= 0:
        raise DataSourceError(f"no {split} records to write to {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    paths = shard_paths(out_dir, split, shards)
    bounds = np.linspace(0, count, shards + 1).astype(int)
    bar = tqdm(total=count, desc=f"{split}", unit="rec", disable=not progress, mininterval=0.5)
    iterator = iter(records)
    for path, lo, hi in zip(paths, bounds[:-1], bounds[1:]):
        writer = ArrayRecordWriter(path, "group_size:1")
        try:
            for _ in range(lo, hi):
                writer.write(encode_record(next(iterator)))
                bar.update(1)
        finally:
            writer.close()
    bar.close()
    return paths


def _png(image: np.ndarray) -> bytes:
    Image = require("PIL.Image", "stream", "depthlab data convert")

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image).save(buffer, "PNG")
    return buffer.getvalue()


def _image_entry(image: np.ndarray):
    image = np.asarray(image)
    if image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))):
        return _png(image)
    return np.asarray(image, np.float32)


def _finish(out_dir: str, kind: str, splits: dict, extra: dict, progress: bool) -> dict:
    files = [p for s in splits.values() for p in s["files"]]
    size = sum(os.path.getsize(p) for p in files)
    summary = {"kind": kind, "out": out_dir, "records": sum(s["records"] for s in splits.values()),
               "bytes": size, "files": len(files), "splits": splits, **extra}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if progress:
        print(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    parts = ", ".join(f"{name} {s['records']:,}" for name, s in summary["splits"].items())
    line = (f"Wrote {summary['records']:,} records ({summary['bytes'] / 1e6:.1f} MB) in {summary['files']} files "
            f"to {summary['out']} ({parts})")
    if summary.get("classes"):
        names = summary["classes"]
        line += f"; {len(names)} classes: " + ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    if summary.get("image_shape"):
        line += f"; images {'x'.join(map(str, summary['image_shape']))}"
    if "train" in summary["splits"] and summary["kind"] != "text":
        line += (f"\nTrain with --config.data.source=arrayrecord:"
                 f"{os.path.join(summary['out'], 'train-*.array_record')}")
    if summary["kind"] == "text":
        line += (f"; vocabulary {summary['vocab_size']:,} ({summary['tokenizer']}), {summary['dtype']}"
                 f"\nTrain with --config.data.source=tokens:{os.path.join(summary['out'], 'train.bin')}")
    return line


# ----------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------
def _class_folders(root: str) -> dict[str, list[str]]:
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    out = {}
    for name in classes:
        folder = os.path.join(root, name)
        out[name] = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    return out


def _image_folder_splits(root: str, test_fraction: float, seed: int) -> tuple[list[str], dict]:
    """(class names, {split: [(path, label)]}) from root/CLASS/*.png or root/{train,test}/CLASS/*.png."""
    subdirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    split_dirs = {SPLIT_FOLDERS[k]: v for k, v in subdirs.items() if k in SPLIT_FOLDERS}
    if "train" in split_dirs:
        per_split = {split: _class_folders(os.path.join(root, d)) for split, d in split_dirs.items()}
    else:
        per_split = {"all": _class_folders(root)}
    classes = sorted({c for folders in per_split.values() for c, files in folders.items() if files})
    if not classes:
        raise DataSourceError(f"{root} has no class folders with images ({', '.join(IMAGE_SUFFIXES)}); lay it out "
                              f"as {root}/CLASS_NAME/image.png (one folder per class)")
    label = {c: i for i, c in enumerate(classes)}
    splits = {split: [(p, label[c]) for c, files in folders.items() for p in files]
              for split, folders in per_split.items()}
    if "all" in splits:
        items = splits.pop("all")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(items))
        n_test = int(round(len(items) * test_fraction))
        splits = {"train": [items[i] for i in sorted(order[n_test:])]}
        if n_test:
            splits["test"] = [items[i] for i in sorted(order[:n_test])]
    return classes, splits


def _image_records(items: Sequence[tuple[str, int]], size: tuple[int, int] | None):
    Image = require("PIL.Image", "stream", "depthlab data convert")

    for path, label in items:
        if size is None and path.lower().endswith((".png", ".jpg", ".jpeg")):
            with open(path, "rb") as f:
                yield {"image": f.read(), "label": int(label)}
            continue
        with Image.open(path) as image:
            if size is not None:
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            yield {"image": _png(np.asarray(image)), "label": int(label)}


def _image_shape(path: str, size) -> tuple:
    Image = require("PIL.Image", "stream", "depthlab data convert")

    with Image.open(path) as image:
        channels = len(image.getbands())
        return (size[0], size[1], channels) if size else (image.height, image.width, channels)


def _check_one_size(items, size) -> tuple:
    """The common [H, W, C] of all images (headers only); one line naming two images that differ."""
    first = None
    for path, _ in items:
        try:
            shape = _image_shape(path, size)
        except Exception as e:  # noqa: BLE001 - Pillow's several error types for a bad file
            raise DataSourceError(f"{path} is not a readable image ({e}); delete or replace it") from None
        if first is None:
            first = (path, shape)
        elif shape != first[1]:
            raise DataSourceError(f"mixed image sizes: {path} is {'x'.join(map(str, shape))} but {first[0]} is "
                                  f"{'x'.join(map(str, first[1]))}; pass --size HxW to resize all of them")
    return first[1]


def convert_image_folder(root: str, out_dir: str, shards: int = 1, size: tuple[int, int] | None = None,
                         test_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
    if not os.path.isdir(root):
        raise DataSourceError(f"no such image folder {root!r}")
    classes, splits = _image_folder_splits(root, test_fraction, seed)
    shape = None
    for items in splits.values():
        shape = _check_one_size(items, size) if shape is None else shape
        if _check_one_size(items, size) != shape:
            raise DataSourceError(f"the splits of {root} have images of different sizes; pass --size HxW")
    written = {}
    for split, items in splits.items():
        n_shards = max(1, round(shards * len(items) / max(len(splits.get("train", items)), 1)))
        paths = write_arrayrecord(_image_records(items, size), len(items), out_dir, split, n_shards, progress)
        written[split] = {"files": paths, "records": len(items)}
    return _finish(out_dir, "images", written, {"classes": classes, "image_shape": list(shape),
                                                "features": {"image": "encoded image", "label": "int"}}, progress)


# ----------------------------------------------------------------------------------------------
# .npz arrays
# ----------------------------------------------------------------------------------------------
def convert_npz(path: str, out_dir: str, shards: int = 1, progress: bool = True) -> dict:
    if not os.path.isfile(path):
        raise DataSourceError(f"no such .npz file {path!r}")
    with np.load(path) as f:
        missing = [k for k in ("x_train", "y_train") if k not in f]
        if missing:
            raise DataSourceError(f"{path} lacks {missing}; a .npz dataset needs x_train, y_train (and x_test, "
                                  f"y_test)")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test") if k in f}
    written = {}
    for split in ("train", "test"):
        if f"x_{split}" not in arrays:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataSourceError(f"{path}: x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        records = ({"image": _image_entry(x[i]), "label": int(y[i])} for i in range(len(x)))
        n_shards = shards if split == "train" else max(1, shards * len(x) // max(len(arrays["x_train"]), 1))
        written[split] = {"files": write_arrayrecord(records, len(x), out_dir, split, n_shards, progress),
                          "records": int(len(x))}
    labels = np.concatenate([arrays["y_train"]] + ([arrays["y_test"]] if "y_test" in arrays else []))
    shape = list(arrays["x_train"].shape[1:]) + ([1] if arrays["x_train"].ndim == 3 else [])
    return _finish(out_dir, "npz", written, {"classes": [str(c) for c in range(int(labels.max()) + 1)],
                                             "image_shape": shape}, progress)


# ----------------------------------------------------------------------------------------------
# Text -> token files
# ----------------------------------------------------------------------------------------------
def convert_text(path: str, out_dir: str, tokenizer: str = "char", vocab_size: int = 1000,
                 val_fraction: float = 0.1, progress: bool = True) -> dict:
    """Tokenises a UTF-8 text file with research/datasets/text.py's tokenizers (the first 1 - val_fraction
    for training, the rest for validation, as the in-memory LM experiments split it)."""
    from depthlab.research.datasets import text

    if not os.path.isfile(path):
        raise DataSourceError(f"no such text file {path!r}")
    corpus = text.load_corpus(path)
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer == "char":
        tok = text.CharTokenizer.from_text(corpus)
        ids = tok.encode(corpus)
        with open(os.path.join(out_dir, "tokenizer.json"), "w") as f:
            f.write(tok.to_json())
    elif tokenizer == "subword":
        lines = [line for line in corpus.splitlines() if line.strip()]
        tok = text.SubwordTokenizer.train(lines, vocab_size=vocab_size)
        chunks = [lines[i:i + 10_000] for i in range(0, len(lines), 10_000)]
        ids = np.concatenate([np.asarray([t for line in chunk for t in tok.encode(line + "\n")], np.int64)
                              for chunk in tqdm(chunks, desc="tokenise", disable=not progress)])
        with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
            f.write(tok.model_proto)
    else:
        raise DataSourceError(f"unknown tokenizer {tokenizer!r}; use char or subword")
    dtype = np.uint16 if tok.vocab_size <= 2 ** 16 else np.uint32
    train, val = text.split_tokens(np.asarray(ids), val_fraction)
    written = {}
    for split, part in (("train", train), ("val", val)):
        out = os.path.join(out_dir, f"{split}.bin")
        part.astype(dtype).tofile(out)
        written[split] = {"files": [out], "records": int(len(part))}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump({"dtype": np.dtype(dtype).name, "vocab_size": int(tok.vocab_size), "tokenizer": tokenizer,
                   "source": os.path.abspath(path)}, f, indent=2)
    return _finish(out_dir, "text", written, {"tokenizer": tokenizer, "vocab_size": int(tok.vocab_size),
                                              "dtype": np.dtype(dtype).name}, progress)


def load_tokenizer(directory: str):
    """The tokenizer `convert_text` saved in `directory` (characters or SentencePiece)."""
    from depthlab.research.datasets import text

    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        with open(os.path.join(directory, "tokenizer.json")) as f:
            return text.CharTokenizer.from_json(f.read())
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        with open(os.path.join(directory, "tokenizer.model"), "rb") as f:
            return text.SubwordTokenizer(f.read())
    raise DataSourceError(f"{directory} has no tokenizer.json or tokenizer.model; convert the text with "
                          f"`depthlab data convert FILE.txt --out {directory}`")


def parse_size(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
        return h, w
    except ValueError:
        raise DataSourceError(f"--size {value!r} is not HxW (e.g. 32x32)") from None


def convert(source: str, out_dir: str, kind: str | None = None, **options) -> dict:
    """Picks the converter by `kind` ('images', 'npz', 'text') or by what `source` is."""
    if kind is None:
        kind = "images" if os.path.isdir(source) else "npz" if source.endswith(".npz") else "text"
    if kind == "images":
        return convert_image_folder(source, out_dir, **{k: v for k, v in options.items() if k in (
            "shards", "size", "test_fraction", "seed", "progress")})
    if kind == "npz":
        return convert_npz(source, out_dir, **{k: v for k, v in options.items() if k in ("shards", "progress")})
    if kind == "text":
        return convert_text(source, out_dir, **{k: v for k, v in options.items() if k in (
            "tokenizer", "vocab_size", "val_fraction", "progress")})
    raise DataSourceError(f"unknown kind {kind!r}; use images, npz or text")
