"""python -m d2build.deploy BUNDLE IMAGE... : detections.json from a bundle, without torch or Detectron2.

Checks the bundle (digests, format), runs it with the chosen backend and prints (or writes, with
--out) a detections document in `d2build infer`'s format. Exit 2 with one line on a bad bundle or
image, naming the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None, *, bundle: str | None = None, prog: str = "python -m d2build.deploy") -> int:
    """`bundle` given (a bundle's own detect.py): that bundle, and no bundle argument on the command line."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    if bundle is None:
        p.add_argument("bundle", help="a bundle folder written by `d2build deploy`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--backend", default="auto", help="auto (default), tensorrt, onnxruntime or reference")
    p.add_argument("--device", default="0", help="cpu, cuda or cuda:N: where the model runs (a standard-op graph on "
                                             "ONNX Runtime's CUDA provider, or the engine); a bare N is the "
                                             "engine's CUDA device (a graph then runs on the CPU). Default 0")
    p.add_argument("--out", help="write detections.json here instead of printing it")
    args = p.parse_args(argv)
    if bundle is not None:
        args.bundle = bundle
    from d2build.deploy.bundle import BundleError, load_bundle
    from d2build.deploy.runtime import ImageError, detections_to_dict, load_image

    try:
        device = int(args.device) if args.device.strip().isdigit() else args.device
        model, opened = load_bundle(args.bundle, args.backend, device=device)
        images = []
        for path in args.images:
            det, lb, seconds = model.detect(load_image(path))
            images.append(detections_to_dict(Path(path).name, det, lb.original_hw, model.info, seconds))
    except (BundleError, ImageError) as e:
        print(f"d2build: {e}", file=sys.stderr)
        return 2
    doc = {"bundle": opened.name, "key": opened.key, "backend": opened.backend, "input": list(model.input_hw),
           "images": images}
    text = json.dumps(doc, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
