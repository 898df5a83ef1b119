"""Class-conditional image sets: scikit-learn's digits, or a user's folder of class sub-folders.

Images are float32 [N, C, H, W] in [-1, 1]; the train / held-out split is stratified and fixed by
a seed. The generative model trains on `train` only. The held-out images are split once more
(`judge_split`): one part trains the quality classifier, the other is the reference that FD and
accuracy are measured against. So the generative model never sees the classifier's images, and the
classifier never sees the reference or the train images. Real train images against the reference
are then what real data scores: every image the floor compares is unseen by the classifier, as
generated samples are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class ImageSet:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor  # held out
    test_y: torch.Tensor
    class_names: list
    source: dict = field(default_factory=dict)  # how to rebuild this exact split (goes into model.json)

    @property
    def shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def stratified_split(labels: np.ndarray, holdout: float, seed: int):
    """(train_idx, test_idx): per class, a fixed fraction held out (at least one image each)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = max(1, round(holdout * len(idx))) if len(idx) > 1 else 0
        test.append(idx[:k]), train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split(x: torch.Tensor, y: np.ndarray, names, holdout, seed, source) -> ImageSet:
    tr, te = stratified_split(y, holdout, seed)
    y = torch.as_tensor(y, dtype=torch.long)
    return ImageSet(x[tr].contiguous(), y[tr], x[te].contiguous(), y[te], list(names),
                    {**source, "holdout": holdout, "split_seed": seed})


@dataclass
class JudgeSplit:
    """The held-out images, split for evaluation: the classifier's training part and the reference."""
    clf_x: torch.Tensor
    clf_y: torch.Tensor
    ref_x: torch.Tensor
    ref_y: torch.Tensor
    spec: dict  # goes into classifier.json: how to rebuild it


def judge_split(data: ImageSet, reference: float = 0.5, seed: int = 0) -> JudgeSplit:
    """Stratified split of the held-out images: a `reference` fraction (at least one image per class)
    for FD and accuracy, the rest to train the classifier."""
    if not 0 < reference < 1:
        raise ValueError(f"reference fraction must be in (0, 1), got {reference}")
    clf, ref = stratified_split(data.test_y.numpy(), reference, seed)
    if len(clf) == 0 or len(torch.unique(data.test_y[clf])) < data.num_classes:
        raise ValueError(f"the held-out set ({len(data.test_x)} images) is too small to give the classifier an "
                         "image of every class and keep a reference; the data set needs more images per class")
    return JudgeSplit(data.test_x[clf], data.test_y[clf], data.test_x[ref], data.test_y[ref],
                      {"of": "held-out", "reference": reference, "seed": seed,
                       "classifier_images": len(clf), "reference_images": len(ref)})


def classifier_judge_split(data: ImageSet, classifier_meta: dict) -> JudgeSplit:
    """The split a classifier.json records (the reference its FD is measured against)."""
    spec = classifier_meta.get("data", {}).get("split")
    if spec is None:
        raise ValueError("classifier.json records no held-out split: it was trained on the model's own train "
                         "images, so its FD has no real floor; retrain it (stride offline train-classifier ARTIFACT)")
    return judge_split(data, spec["reference"], spec["seed"])


def load_digits(size: int = 16, holdout: float = 0.2, seed: int = 0) -> ImageSet:
    """sklearn's 1797 8x8 digits (values 0..16), bilinear to size x size, scaled to [-1, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 2 - 1).contiguous()
    names = [str(i) for i in range(10)]
    return _split(x, d.target, names, holdout, seed, {"dataset": "digits", "size": size})


def load_folder(path, size: int = 16, channels: int = 1, holdout: float = 0.2, seed: int = 0) -> ImageSet:
    """Images under path/<class name>/*.png|jpg|..., resized (bicubic) to size x size, grayscale
    (channels=1) or RGB (channels=3); classes are the sub-folders in sorted order."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders; "
                         f"expected {root}/<class>/<image>.png")
    xs, ys = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise ValueError(f"class folder {str(root / name)!r} has no images "
                             f"(looked for {sorted(IMAGE_EXTS)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
                    a = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {str(f)!r}: {e}") from e
            xs.append(a[None] if channels == 1 else a.transpose(2, 0, 1)), ys.append(c)
    if len(classes) > 1 and min(np.bincount(ys)) < 2:
        raise ValueError("every class needs at least 2 images (one to train on, one held out)")
    x = torch.as_tensor(np.stack(xs)) * 2 - 1
    return _split(x, np.asarray(ys), classes, holdout, seed,
                  {"dataset": "folder", "path": str(root), "size": size, "channels": channels})


def load_data(spec: str, size: int = 16, channels: int = 1, holdout: float = 0.2, seed: int = 0) -> ImageSet:
    """'digits' or a folder path."""
    if spec == "digits":
        return load_digits(size, holdout, seed)
    return load_folder(spec, size, channels, holdout, seed)


def data_from_source(source: dict) -> ImageSet:
    """Rebuild the exact split recorded in an artifact's model.json."""
    kw = {"size": source["size"], "holdout": source["holdout"], "seed": source["split_seed"]}
    if source["dataset"] == "digits":
        return load_digits(**kw)
    return load_folder(source["path"], channels=source.get("channels", 1), **kw)
