"""Datasets for training and evaluation: the shipped digits split and user data from arrays or images.

The digits are scikit-learn's 1797 8×8 images (pixel values 0..16), shipped as a compressed .npz with
a fixed, seeded split (1497 train / 300 held-out; numpy default_rng(0) permutation) so that nothing
at run time needs scikit-learn. Model space is [−1, 1]: x = v/8 − 1.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import FileFormatError

__all__ = [
    "load_digits",
    "digits_labels",
    "integer_levels",
    "read_array",
    "load_array",
    "load_image_folder",
    "load_dataset",
    "to_uint8",
    "NPZ_KEYS",
    "FASHION_DIR",
    "FASHION_CLASSES",
    "load_fashion_mnist",
    "fashion_labels",
]

_SPLITS = ("train", "heldout")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")

#: Array names ``load_array`` looks for in an .npz that holds several arrays (first found wins).
NPZ_KEYS = ("x", "images", "train_images")


def _digits_npz() -> dict[str, np.ndarray]:
    with resources.files("fastsde").joinpath("_assets", "data", "digits.npz").open("rb") as fh:
        with np.load(fh) as z:
            return {k: z[k] for k in z.files}


def load_digits(split: str = "train", dtype: torch.dtype = torch.float32) -> Tensor:
    """The digits split ("train" or "heldout") as a tensor (n, 1, 8, 8) scaled to [−1, 1]."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    raw = _digits_npz()[f"{split}_images"].astype(np.float64)
    return torch.from_numpy(raw / 8.0 - 1.0).to(dtype).unsqueeze(1)


def digits_labels(split: str = "train") -> Tensor:
    """Class labels (0..9) of a digits split, aligned with load_digits(split)."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return torch.from_numpy(_digits_npz()[f"{split}_labels"].astype(np.int64))


def _to_nchw(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.ndim == 2:
        raise ValueError(f"{source}: expected images (n, H, W) or (n, C, H, W), got shape {arr.shape}")
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    if arr.ndim != 4:
        raise ValueError(f"{source}: expected images (n, H, W) or (n, C, H, W), got shape {arr.shape}")
    return arr


def integer_levels(arr: np.ndarray) -> int:
    """Quantisation levels of integer data as fastsde reads it: 17 (the digits' 0..16) when the
    largest value is ≤ 16, else 256 (8-bit, 0..255)."""
    return 17 if int(arr.max()) <= 16 else 256


def _scale(arr: np.ndarray, source: str) -> np.ndarray:
    """Map integer images (0..255) or floats in [0, 1] to [−1, 1]; floats already in [−1, 1] pass."""
    if np.issubdtype(arr.dtype, np.integer):
        hi = float(integer_levels(arr) - 1)
        return arr.astype(np.float64) / (hi / 2.0) - 1.0
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{source}: the array holds NaN or Inf")
    lo, hi = float(arr.min()), float(arr.max())
    if lo >= 0.0 and hi <= 1.0:
        return arr * 2.0 - 1.0
    if lo >= -1.0 and hi <= 1.0:
        return arr
    raise ValueError(f"{source}: float data must lie in [0, 1] or [−1, 1], got range [{lo:g}, {hi:g}]")


def read_array(
    path: str | Path, key: str | None = None, *, prefer: tuple[str, ...] = NPZ_KEYS, key_hint: str = "a key"
) -> np.ndarray:
    """The array stored in an .npy file, or one array of an .npz file, as saved (no scaling).

    For .npz: ``key`` names the array; without it the file's only array, or else the first name of
    ``prefer`` the file holds. ``key_hint`` says, in the error for an .npz of several arrays, how to
    name one (the likelihood command says "--key").
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such data file: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ValueError(f"data file must be .npy or .npz, got {path.name!r}")
    with open(path, "rb") as fh:
        magic = fh.read(6)

    def bad(reason: str) -> FileFormatError:
        return FileFormatError(path, None, reason, message=f"cannot read {path}: {reason}")

    if suffix == ".npz" and not magic.startswith(b"PK"):  # numpy would read it as a pickle and say so
        raise bad("not an .npz file (an .npz is a zip archive of .npy arrays)")
    if suffix == ".npy" and magic != b"\x93NUMPY":
        raise bad("not an .npy file (no numpy header)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - a corrupt or non-numpy file
        raise bad(str(exc)) from None
    if suffix == ".npy":
        return loaded
    with loaded:
        names = list(loaded.files)
        if key is not None and key not in names:
            raise FileFormatError(
                path, key, f"an array named {key!r}", message=f"{path.name} has no array {key!r}; it holds {names}"
            )
        if not names:
            raise FileFormatError(path, None, "at least one array", message=f"{path.name} holds no arrays")
        if key is None and len(names) != 1:
            key = next((cand for cand in prefer if cand in names), None)
            if key is None:
                raise FileFormatError(
                    path,
                    None,
                    "one array",
                    message=f"{path.name} holds several arrays {names}; name one with {key_hint}",
                )
        try:
            return loaded[key if key is not None else names[0]]
        except Exception as exc:  # noqa: BLE001 - a corrupt member of the zip archive
            raise bad(f"array {key or names[0]!r}: {exc}") from None


def _check_images(arr: np.ndarray, source: str) -> np.ndarray:
    """Images of a real dtype (integers 0..255, or floats), at least one, no empty axis."""
    if arr.dtype.kind not in "biuf":
        raise FileFormatError(source, None, f"integer or float images, got dtype {arr.dtype}", what="an image array")
    if arr.size == 0:
        raise FileFormatError(source, None, f"at least one image, got shape {arr.shape}", what="an image array")
    if arr.dtype.kind in "iu" and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise FileFormatError(
            source, None, f"integer pixels in 0..255, got [{int(arr.min())}, {int(arr.max())}]", what="an image array"
        )
    return arr.astype(np.float64) if arr.dtype.kind == "b" else arr  # False/True: black/white, [0, 1]


def load_array(path: str | Path, key: str | None = None) -> Tensor:
    """Images from an .npy or .npz file as float32 (n, C, H, W) in [−1, 1].

    Integer arrays are read as 0..255 (or 0..16 when the max is ≤ 16); float arrays must lie in [0, 1]
    or [−1, 1]. For .npz, ``key`` names the array (default: the only one, or "x"/"images"/"train_images").
    """
    arr = _check_images(read_array(path, key), str(path))
    try:
        return torch.from_numpy(_scale(_to_nchw(arr, str(path)), str(path))).float()
    except FileFormatError:
        raise
    except ValueError as exc:  # _to_nchw / _scale name the file
        raise FileFormatError(path, None, str(exc), message=str(exc)) from None


def load_image_folder(path: str | Path, grayscale: bool = True) -> Tensor:
    """Every image in a folder (same size required) as float32 (n, C, H, W) in [−1, 1]."""
    import matplotlib.image as mpimg

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) in folder {path}")
    images = []
    for f in files:
        try:
            im = np.asarray(mpimg.imread(f))
        except Exception as exc:  # noqa: BLE001 - PIL / matplotlib raise many types on corrupt images
            raise FileFormatError(f, None, f"{type(exc).__name__}: {str(exc)[:200]}", what="a readable image") from None
        if im.ndim not in (2, 3) or im.size == 0 or im.dtype.kind not in "biuf":
            raise FileFormatError(f, None, f"a 2-D image, got shape {im.shape} dtype {im.dtype}", what="an image")
        if np.issubdtype(im.dtype, np.integer):
            im = im.astype(np.float64) / 255.0
        if im.ndim == 3:
            im = im[..., :3]
            im = im.mean(-1, keepdims=True) if grayscale else im
            im = im.transpose(2, 0, 1)
        else:
            im = im[None] if grayscale else np.repeat(im[None], 3, axis=0)
        images.append(im.astype(np.float64))
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"images in {path} differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack(images) * 2.0 - 1.0).float()


#: Where Debian's ``dataset-fashion-mnist`` package puts the four idx files (``FASHION_MNIST_DIR`` overrides).
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
#: Fashion-MNIST's class names, by label.
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_FILES = {"train": "train", "heldout": "t10k"}


def _fashion_dir() -> Path:
    import os

    return Path(os.environ.get("FASHION_MNIST_DIR", FASHION_DIR))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One gzipped idx file (the MNIST format: magic 0x0000 08 <ndim>, big-endian sizes, uint8 data)."""
    import gzip

    if not path.is_file():
        raise FileNotFoundError(
            f"Fashion-MNIST file {path} is missing: install the Debian package dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist), or set FASHION_MNIST_DIR to a folder holding its four idx files"
        )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as exc:
        raise FileFormatError(path, None, f"a gzipped idx file ({exc})", what="a Fashion-MNIST file") from None
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise FileFormatError(path, None, f"an idx file of {ndim}-D uint8 data", what="a Fashion-MNIST file")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise FileFormatError(path, None, f"{int(np.prod(dims))} values for sizes {dims}, got {body.size}")
    return body.reshape(dims)


def _fashion_split(split: str) -> str:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    return _FASHION_FILES[split]


def load_fashion_mnist(split: str = "train", dtype: torch.dtype = torch.float32) -> Tensor:
    """Fashion-MNIST as (n, 1, 28, 28) in [−1, 1] (x = v/127.5 − 1), read from the Debian package's files.

    The split is the dataset's own: "train" its 60 000 training images, "heldout" its 10 000 test images
    (never trained on; the quality metric's reference statistics come from them)."""
    name = _fashion_split(split)
    raw = _read_idx(_fashion_dir() / f"{name}-images-idx3-ubyte.gz", 3)
    return torch.from_numpy(raw.astype(np.float32) / 127.5 - 1.0).to(dtype).unsqueeze(1)


def fashion_labels(split: str = "train") -> Tensor:
    """Class labels (0..9, names in FASHION_CLASSES) of a Fashion-MNIST split, aligned with load_fashion_mnist."""
    name = _fashion_split(split)
    return torch.from_numpy(_read_idx(_fashion_dir() / f"{name}-labels-idx1-ubyte.gz", 1).astype(np.int64))


def load_dataset(spec: str) -> Tensor:
    """Training data by name: "digits" (the shipped train split), "fashion" (Fashion-MNIST's training
    images, from the Debian package), an .npy/.npz file or an image folder."""
    if spec == "digits":
        return load_digits("train")
    if spec == "fashion":
        return load_fashion_mnist("train")
    path = Path(spec)
    if path.is_dir():
        return load_image_folder(path)
    if path.suffix in (".npy", ".npz"):
        return load_array(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no such dataset: {spec!r} (use 'digits', 'fashion', an .npy/.npz file or an image folder)"
        )
    raise ValueError(f"dataset must be 'digits', 'fashion', an .npy/.npz file or an image folder, got {spec!r}")


def to_uint8(x: Tensor) -> np.ndarray:
    """Model-space images in [−1, 1] to uint8 0..255 (clipped), for saving."""
    arr = ((x.detach().double().clamp(-1, 1) + 1.0) * 127.5).round()
    return arr.cpu().numpy().astype(np.uint8)
