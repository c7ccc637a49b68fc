"""Generated scenes with exact labels for detection and segmentation (no download, seconds to make).

`make_scenes` paints coloured shapes (circle, square, triangle, cross) — or real handwritten digits
from scikit-learn's bundled 8x8 set — onto a textured, noisy canvas with clutter (thin lines and
specks smaller than any object). Objects never overlap, so every label is exact: the box is the
tight box of the object's own pixels, and the masks are the painted pixels.
`make_lesions` is the medical-imaging flavour: one class of faint, soft-edged blobs on a textured
grey background, where the task is to segment them (Dice is the usual score).

Every function returns a dict of numpy arrays (the engine's batch format):
  images    [N, H, W, 3] float32 in [0, 1]  ([N, H, W, 1] for lesions)
  boxes     [N, M, 4] float32 xyxy pixel edges: pixel (row r, col c) spans [c, c+1) x [r, r+1); zero padded
  classes   [N, M] int32 class ids 0..C-1; -1 marks padding
  num_objects [N] int32
  semantic  [N, H, W] int32: 0 background, 1 + class id for object pixels
  instance  [N, H, W] int32: 0 background, k + 1 for pixels of object k (row k of boxes)

Example:
    >>> data = make_scenes(1000, seed=0)
    >>> data["images"].shape, data["boxes"].shape       # (1000, 64, 64, 3), (1000, 4, 4)
    >>> SHAPE_CLASSES[data["classes"][0, 0]]            # e.g. 'triangle'
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

SHAPE_CLASSES = ("circle", "square", "triangle", "cross")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
LESION_CLASSES = ("lesion",)


# --- shapes on a local patch --------------------------------------------------------------------

def shape_mask(name: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape sampled at pixel centers."""
    v, u = np.mgrid[0:size, 0:size] + 0.5   # v: row (y), u: column (x)
    half = size / 2
    if name == "circle":
        return (u - half) ** 2 + (v - half) ** 2 <= half**2
    if name == "square":
        return np.ones((size, size), bool)
    if name == "triangle":   # apex at the top middle, base along the bottom
        return np.abs(u - half) <= v / 2
    if name == "cross":      # a plus sign with arms a third of the size thick
        return (np.abs(u - half) <= size / 6) | (np.abs(v - half) <= size / 6)
    raise ValueError(f"unknown shape {name!r}; valid shapes: {', '.join(SHAPE_CLASSES)}")


def _digit_masks(rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """A random sklearn digit resized to [size, size]: (intensity in [0, 1], class)."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    digits = _digit_cache.get("digits")
    if digits is None:
        digits = _digit_cache.setdefault("digits", load_digits())
    i = int(rng.integers(len(digits.target)))
    img = digits.images[i] / 16.0
    img = ndimage.zoom(img, size / 8.0, order=1)[:size, :size]
    return np.clip(img, 0, 1), int(digits.target[i])


_digit_cache: dict = {}   # the digits array is constant data; caching it keeps generation fast


# --- canvas ---------------------------------------------------------------------------------------

def _background(rng: np.random.Generator, size: int, channels: int, texture: float) -> np.ndarray:
    """A smooth random colour gradient plus low-frequency texture, [size, size, channels]."""
    base = rng.uniform(0.1, 0.5, (1, 1, channels))
    ramp = np.linspace(-1, 1, size)
    gx, gy = rng.uniform(-0.1, 0.1, (2, 1, 1, channels))
    img = base + gx * ramp[None, :, None] + gy * ramp[:, None, None]
    blur = ndimage.gaussian_filter(rng.normal(size=(size, size, channels)), sigma=(3, 3, 0))
    return img + texture * blur / (blur.std() + 1e-8)


def _draw_clutter(rng: np.random.Generator, img: np.ndarray, num_lines: int, num_specks: int) -> None:
    """Thin straight lines and 1-3 px specks: distractors smaller than any object, drawn in place."""
    size = img.shape[0]
    for _ in range(num_lines):
        (x0, y0), (x1, y1) = rng.uniform(0, size, (2, 2))
        t = np.linspace(0, 1, 2 * size)
        rows = np.clip((y0 + t * (y1 - y0)).astype(int), 0, size - 1)
        cols = np.clip((x0 + t * (x1 - x0)).astype(int), 0, size - 1)
        img[rows, cols] = rng.uniform(0, 1, img.shape[-1])
    for _ in range(num_specks):
        r, c = rng.integers(0, size - 3, 2)
        k = int(rng.integers(1, 4))
        img[r:r + k, c:c + k] = rng.uniform(0, 1, img.shape[-1])


def _place(rng: np.random.Generator, sizes: list[int], image_size: int, gap: int) -> list[tuple[int, int]]:
    """Top-left corners for square patches that keep `gap` pixels apart (rejection sampling)."""
    placed: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(100):
            r, c = (int(v) for v in rng.integers(0, image_size - s + 1, 2))
            if all(r + s + gap <= r2 or r2 + s2 + gap <= r or c + s + gap <= c2 or c2 + s2 + gap <= c
                   for r2, c2, s2 in placed):
                placed.append((r, c, s))
                break
    return [(r, c) for r, c, _ in placed]


def _tight_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def make_scenes(num_images: int, image_size: int = 64, min_objects: int = 1, max_objects: int = 4,
                min_size: int = 10, max_size: int = 20, kind: str = "shapes", noise: float = 0.05,
                texture: float = 0.05, clutter: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Scenes of non-overlapping objects with exact boxes, classes and masks (see module docstring).

    Args:
      num_images: N.
      image_size: H = W.
      min_objects, max_objects: objects per image (uniform); M = max_objects. If an object finds no
        free spot after 100 tries it is left out, so an image can hold fewer than min_objects.
      min_size, max_size: object side in pixels. min_size >= 8 keeps object centers in distinct
        cells of a stride-4 grid (the detector's one-object-per-cell assignment relies on it).
      kind: "shapes" (classes SHAPE_CLASSES) or "digits" (sklearn digits, classes DIGIT_CLASSES).
      noise: std of per-pixel Gaussian noise; texture: amplitude of the smooth background texture.
      clutter: number of distractor lines (and twice as many specks) per image.
      seed: the numpy seed; the same arguments give the same arrays.
    """
    if kind not in ("shapes", "digits"):
        raise ValueError(f"unknown kind {kind!r}; valid: shapes, digits")
    if not 1 <= min_size <= max_size <= image_size:
        raise ValueError(f"need 1 <= min_size <= max_size <= image_size, got {min_size}, {max_size}, {image_size}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = np.random.default_rng(seed)
    n, s, m = num_images, image_size, max_objects
    out = {
        "images": np.zeros((n, s, s, 3), np.float32),
        "boxes": np.zeros((n, m, 4), np.float32),
        "classes": np.full((n, m), -1, np.int32),
        "num_objects": np.zeros((n,), np.int32),
        "semantic": np.zeros((n, s, s), np.int32),
        "instance": np.zeros((n, s, s), np.int32),
    }
    for i in range(n):
        img = _background(rng, s, 3, texture)
        _draw_clutter(rng, img, clutter, 2 * clutter)
        count = int(rng.integers(min_objects, max_objects + 1))
        sizes = [int(v) for v in rng.integers(min_size, max_size + 1, count)]
        corners = _place(rng, sizes, s, gap=2)
        for k, ((r, c), size) in enumerate(zip(corners, sizes)):
            color = rng.uniform(0.55, 1.0, 3) * rng.permutation([1.0, 1.0, rng.uniform(0, 0.4)])
            if kind == "shapes":
                cls = int(rng.integers(len(SHAPE_CLASSES)))
                alpha = shape_mask(SHAPE_CLASSES[cls], size).astype(np.float32)
            else:
                alpha, cls = _digit_masks(rng, size)
            mask = alpha > 0.5
            patch = img[r:r + size, c:c + size]
            patch[:] = patch * (1 - alpha[..., None]) + alpha[..., None] * color
            out["semantic"][i, r:r + size, c:c + size][mask] = cls + 1
            out["instance"][i, r:r + size, c:c + size][mask] = k + 1
            out["boxes"][i, k] = _tight_box(mask) + np.array([c, r, c, r], np.float32)
            out["classes"][i, k] = cls
        out["num_objects"][i] = len(corners)
        img += noise * rng.normal(size=img.shape)
        out["images"][i] = np.clip(img, 0, 1)
    return out


def make_lesions(num_images: int, image_size: int = 64, max_lesions: int = 3, min_radius: float = 3.0,
                 max_radius: float = 9.0, contrast: float = 0.12, texture: float = 0.08,
                 noise: float = 0.04, seed: int = 0) -> dict[str, np.ndarray]:
    """Faint blobs ("lesions", one class) on textured grey tissue; the same dict as `make_scenes`
    with 1-channel images. A lesion is a soft-edged ellipse whose brightness rises by `contrast`
    (about the texture's own amplitude); its mask is the ellipse. An image may hold no lesion
    (0..max_lesions, uniform), as in screening data.
    """
    rng = np.random.default_rng(seed)
    n, s, m = num_images, image_size, max_lesions
    out = {
        "images": np.zeros((n, s, s, 1), np.float32),
        "boxes": np.zeros((n, m, 4), np.float32),
        "classes": np.full((n, m), -1, np.int32),
        "num_objects": np.zeros((n,), np.int32),
        "semantic": np.zeros((n, s, s), np.int32),
        "instance": np.zeros((n, s, s), np.int32),
    }
    v, u = np.mgrid[0:s, 0:s] + 0.5
    for i in range(n):
        # Tissue: coarse blotches plus fine grain, both about as strong as a lesion's contrast.
        coarse = ndimage.gaussian_filter(rng.normal(size=(s, s)), 4.0)
        fine = ndimage.gaussian_filter(rng.normal(size=(s, s)), 1.0)
        img = rng.uniform(0.3, 0.5) + texture * (coarse / coarse.std() + 0.5 * fine / fine.std())
        count = int(rng.integers(0, max_lesions + 1))
        k = 0
        for _ in range(count):
            ry, rx = rng.uniform(min_radius, max_radius, 2)
            cy, cx = rng.uniform(max_radius, s - max_radius, 2)
            theta = rng.uniform(0, np.pi)
            du, dv = u - cx, v - cy
            a = (du * np.cos(theta) + dv * np.sin(theta)) / rx
            b = (-du * np.sin(theta) + dv * np.cos(theta)) / ry
            dist = np.sqrt(a**2 + b**2)
            mask = (dist <= 1.0) & (out["instance"][i] == 0)   # a later lesion never eats an earlier one
            if mask.sum() < 4:
                continue
            # Brightness plateaus inside and fades over the outer third of the radius: a faint edge.
            img += contrast * np.clip((1.2 - dist) / 0.4, 0, 1) * (out["instance"][i] == 0)
            out["semantic"][i][mask] = 1
            out["instance"][i][mask] = k + 1
            out["boxes"][i, k] = _tight_box(mask)
            out["classes"][i, k] = 0
            k += 1
        out["num_objects"][i] = k
        img += noise * rng.normal(size=img.shape)
        out["images"][i, ..., 0] = np.clip(img, 0, 1)
    return out


# --- optional real data (needs internet and `pip install depthlab[data]`) ------------------------

def load_tfds_detection(name: str = "voc/2007", split: str = "train", image_size: int = 128,
                        max_objects: int = 20, num_images: int | None = None,
                        data_dir: str | None = None) -> dict[str, np.ndarray]:
    """Loads VOC ("voc/2007", "voc/2012") or COCO ("coco/2017") from TensorFlow Datasets into the
    dict format above (no masks: "semantic"/"instance" are absent). Images are resized (stretched)
    to image_size x image_size and boxes scaled with them; extra objects beyond max_objects are
    dropped. TFDS downloads the data on first use, so this is the one function here that needs
    internet access.
    """
    try:
        import tensorflow_datasets as tfds  # optional: only users of real data pay for TensorFlow
    except ImportError as err:
        raise ImportError("load_tfds_detection needs tensorflow-datasets, which is not installed; "
                          "install it with `pip install depthlab[data]`") from err
    if not (name.startswith("voc") or name.startswith("coco")):
        raise ValueError(f"unknown detection dataset {name!r}; valid: voc/2007, voc/2012, coco/2017")
    ds = tfds.load(name, split=split, data_dir=data_dir)
    if num_images is not None:
        ds = ds.take(num_images)
    images, boxes, classes, counts = [], [], [], []
    for ex in tfds.as_numpy(ds):
        img = ex["image"].astype(np.float32) / 255.0
        h, w = img.shape[:2]
        zoom = (image_size / h, image_size / w, 1)
        images.append(np.clip(ndimage.zoom(img, zoom, order=1)[:image_size, :image_size], 0, 1))
        bbox = ex["objects"]["bbox"][:max_objects]             # normalised (ymin, xmin, ymax, xmax)
        label = ex["objects"]["label"][:max_objects]
        b = np.zeros((max_objects, 4), np.float32)
        c = np.full((max_objects,), -1, np.int32)
        b[:len(bbox)] = bbox[:, [1, 0, 3, 2]] * image_size
        c[:len(label)] = label
        boxes.append(b)
        classes.append(c)
        counts.append(len(label))
    return {"images": np.stack(images), "boxes": np.stack(boxes), "classes": np.stack(classes),
            "num_objects": np.array(counts, np.int32)}
