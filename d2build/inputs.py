"""The files a user hands in, checked before any stage starts (and before any cache key reads them).

Weights, a local Detectron2 config, folders of images (verify, calibration, eval) and a COCO
annotation file: each one that is missing, unreadable, corrupt or of the wrong kind becomes one
`Problem` line naming the file and what is wrong with it -- never a library traceback, and never a
library's advice to load a checkpoint unsafely.

Checkpoints are read the way d2build will load them, minus the tensor data: a restricted unpickler
that admits only what a plain state dict is made of (tensors, numpy arrays, plain containers) walks
the whole pickle, with stand-ins for tensors, so a checkpoint that refers to anything else
(`posix.system`, `builtins.eval`, a class of some training framework) is refused with that name,
and a truncated file is called truncated. No torch import here.
"""

from __future__ import annotations

import _compat_pickle
import io
import json
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any



class _Tensor:
    """Stand-in for a tensor or array: built and given its state without reading any data."""

    def __setstate__(self, state: Any) -> None:
        pass


def _tensor(*args: Any, **kwargs: Any) -> _Tensor:
    return _Tensor()


# what a plain state dict pickle may refer to, with the stand-in the check unpickles instead
_STANDINS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "set"): set,
    ("builtins", "tuple"): tuple,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_tensor"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _tensor,
    ("torch._tensor", "_rebuild_from_type_v2"): _tensor,
    ("numpy.core.multiarray", "_reconstruct"): _tensor,
    ("numpy._core.multiarray", "_reconstruct"): _tensor,
    ("numpy.core.multiarray", "scalar"): lambda *a, **k: 0,
    ("numpy._core.multiarray", "scalar"): lambda *a, **k: 0,
    ("numpy", "ndarray"): object,
    ("numpy", "dtype"): _tensor,
    ("_codecs", "encode"): lambda *a, **k: b"",
    ("torch", "device"): lambda *a, **k: None,
    ("torch", "Size"): tuple,
}
_TORCH_STORAGES = {"FloatStorage", "HalfStorage", "DoubleStorage", "BFloat16Storage", "LongStorage", "IntStorage",
                   "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "UntypedStorage"}


class _Refused(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.ref = f"{module}.{name}"


class _CheckUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names, as protocol 0-2 pickles write them (__builtin__, copy_reg)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _STANDINS:
            return _STANDINS[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return object
        if module == "numpy" and name.endswith("DType"):  # numpy >= 2 pickles dtypes as numpy.dtypes.*DType
            return _tensor
        if module == "numpy.dtypes":
            return _tensor
        raise _Refused(module, name)

    def persistent_load(self, pid: Any) -> Any:
        return None  # tensor storages are not read by the check


def _unpickle_check(data: bytes | io.BufferedIOBase) -> Any:
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    return _CheckUnpickler(f, encoding="latin1").load()


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a .pth/.pkl checkpoint (one phrase), or None when d2build can load it."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "is empty (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        if head.startswith(b"PK"):  # torch.save's zip format
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
                if bad is not None:
                    return f"is corrupt (zip member {bad} fails its CRC check)"
                pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not pkl:
                    return "is a zip file but not a PyTorch checkpoint (no data.pkl inside)"
                obj = _unpickle_check(z.read(pkl[0]))
        elif head[:1] == b"\x80":  # a pickle: model-zoo .pkl, or torch's legacy format (several pickles)
            with open(path, "rb") as f:
                obj = _unpickle_check(f)
                if isinstance(obj, int) and obj == 0x1950A86A20F9469CFC6C:  # torch legacy magic number
                    _unpickle_check(f)  # protocol version
                    _unpickle_check(f)  # system info
                    obj = _unpickle_check(f)
        else:
            return ("is not a PyTorch (.pth) or pickled (.pkl) checkpoint (it starts with "
                    f"{head!r}; is it another kind of file?)")
    except _Refused as e:
        return f"refers to {e.ref}: not a plain state dict; refused (d2build loads only tensors and plain containers)"
    except zipfile.BadZipFile as e:
        return f"is truncated or corrupt (zip: {e})"
    except (EOFError, pickle.UnpicklingError, ValueError, IndexError, TypeError, AttributeError) as e:
        what = "truncated" if isinstance(e, EOFError) or "truncated" in str(e) else "corrupt"
        return f"is {what} ({type(e).__name__}: {e})"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    state = obj.get("model", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict) or not state:
        return f"holds a {type(obj).__name__}, not a state dict (a dict of parameter tensors)"
    if not any(isinstance(v, _Tensor) for v in state.values()):
        return "holds a dict without tensors, not a state dict"
    return None


def image_problem(path: Path) -> str | None:
    """What is wrong with an image file (one phrase), or None when it decodes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() does not decode pixels; load() does
            im.load()
            if im.width < 1 or im.height < 1:
                return "has no pixels"
    except UnidentifiedImageError:
        return "is not an image PIL can decode"
    except OSError as e:
        return f"cannot be decoded ({e})"
    except Exception as e:  # noqa: BLE001 - decoders raise many kinds of errors on broken files
        return f"cannot be decoded ({type(e).__name__}: {e})"
    return None


def images_problems(source: str, count: int | None) -> list[tuple[str, str]]:
    """(file, what is wrong) for a folder of images used by a stage; [] for `bundled`."""
    from d2build import photos

    if source == "bundled":
        return []
    try:
        files = sorted(p for p in Path(source).expanduser().iterdir() if p.suffix.lower() in photos.IMAGE_SUFFIXES)
    except OSError as e:
        return [(source, f"cannot be listed ({e.strerror or e})")]
    if not files:
        return [(source, f"holds no images ({', '.join(photos.IMAGE_SUFFIXES)})")]
    refs = [str(p) for p in files[:count]]
    out = []
    for ref in refs:
        problem = image_problem(Path(ref))
        if problem:
            out.append((ref, problem))
    return out


def coco_problem(path: Path, images: Path | None = None) -> str | None:
    """What is wrong with a COCO instances json (and, with `images`, the files it lists), or None."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError) as e:
        return f"is not valid JSON ({e})"
    if not isinstance(doc, dict):
        return f"holds a JSON {type(doc).__name__}, not a COCO object with images, annotations and categories"
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(doc.get(k), list)]
    if missing:
        return f"is not a COCO instances file: no list {', '.join(missing)}"
    if not doc["images"]:
        return "lists no images"
    for key, need in (("images", ("id", "file_name")), ("annotations", ("image_id", "category_id", "bbox")),
                      ("categories", ("id", "name"))):
        for i, item in enumerate(doc[key]):
            gone = [k for k in need if not isinstance(item, dict) or k not in item]
            if gone:
                return f"{key}[{i}] lacks {', '.join(gone)}"
    if images is not None:
        absent = [im["file_name"] for im in doc["images"] if not (images / im["file_name"]).is_file()]
        if absent:
            return (f"lists {len(absent)} image(s) missing under {images}, e.g. {absent[0]}")
    return None
