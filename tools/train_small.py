#!/usr/bin/env python
"""Train a small Detectron2 model from scratch on d2build.synthetic data; save it compactly; measure AP.

    python tools/train_small.py --model shapes_mask_rcnn     --out models/shapes_mask_rcnn
    python tools/train_small.py --model houses_keypoint_rcnn --out models/houses_keypoint_rcnn
    python tools/train_small.py --model shapes_mask_rcnn --count-params          # build on CPU, count
    python tools/train_small.py --model shapes_mask_rcnn --smoke --out /tmp/smoke  # CPU, a few iterations

Detectron2's own trainer (DefaultTrainer, AMP on a GPU) on a registered dataset whose records carry
seeds; a DatasetMapper subclass draws each image from its seed (d2build.synthetic.render), so no
image files exist during training. The model is a standard GeneralizedRCNN (ResNet-50-FPN with
reduced widths, RPN, StandardROIHeads, FC box head, mask or keypoint head), trained with
RESNETS.NORM "BN", FREEZE_AT 0 and no pre-trained weights.

The schedule is budgeted in time as well as in iterations: progress = max(iter / --max-iter,
seconds / --train-seconds); LR warm-up over SOLVER.WARMUP_ITERS, x0.1 at progress 0.75 and 0.92,
stop at 1. The dumped config records the iterations actually run (SOLVER.MAX_ITER, SOLVER.STEPS).

Afterwards BatchNorm becomes FrozenBatchNorm (its learned statistics), the state dict is saved in
float16 as ``{"model": ...}`` (``model_final.pth``, what DetectionCheckpointer loads) with the full
config dump (``config.yaml``, NORM FrozenBN, WEIGHTS ""), and that saved checkpoint is reloaded
through Detectron2 and evaluated with COCOEvaluator (pycocotools) on the held-out val split:
``metrics.json``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from d2build import synthetic as S  # noqa: E402  (numpy + cv2 only)

MODELS = {
    "shapes_mask_rcnn": {"dataset": "shapes", "base": "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"},
    "houses_keypoint_rcnn": {"dataset": "houses", "base": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_3x.yaml"},
}
SNAPSHOT_PERIOD = 200  # iterations between in-memory copies of the weights (restored if training diverges)
TRAIN_IMAGES = 100_000  # records in the train split (the sampler shuffles them; a run uses <= max_iter * 16)

log = logging.getLogger("train_small")


def zoo_config_path(name: str) -> str:
    """A model-zoo config file shipped in the detectron2 package (without importing detectron2.model_zoo,
    which needs pkg_resources)."""
    root = Path(importlib.util.find_spec("detectron2").submodule_search_locations[0])
    path = root / "model_zoo" / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(path)
    return str(path)


def names(dataset: str) -> tuple[str, str]:
    return f"synthetic_{dataset}_train", f"synthetic_{dataset}_val"


def make_cfg(model_name: str, args):
    from detectron2.config import get_cfg

    spec = MODELS[model_name]
    dataset = spec["dataset"]
    train_name, val_name = names(dataset)
    cfg = get_cfg()
    cfg.merge_from_file(zoo_config_path(spec["base"]))
    m = cfg.MODEL
    m.WEIGHTS = ""
    m.PIXEL_MEAN = [103.530, 116.280, 123.675]  # the standard (BGR, 0..255)
    m.PIXEL_STD = [1.0, 1.0, 1.0]
    m.BACKBONE.FREEZE_AT = 0
    # ResNet-50 (bottleneck blocks 3-4-6-3) at a quarter of the standard widths
    m.RESNETS.DEPTH = 50
    m.RESNETS.NORM = "BN"
    m.RESNETS.STEM_OUT_CHANNELS = 32
    m.RESNETS.RES2_OUT_CHANNELS = 64
    m.RESNETS.NUM_GROUPS = 1
    m.RESNETS.WIDTH_PER_GROUP = 16
    m.FPN.OUT_CHANNELS = 128
    m.ROI_BOX_HEAD.NUM_CONV = 0
    m.ROI_BOX_HEAD.NUM_FC = 2
    m.ROI_BOX_HEAD.FC_DIM = 256
    m.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False
    m.ROI_HEADS.NUM_CLASSES = len(S.CLASSES[dataset])
    if m.MASK_ON:
        m.ROI_MASK_HEAD.CONV_DIM = 128
    if m.KEYPOINT_ON:
        m.ROI_KEYPOINT_HEAD.CONV_DIMS = (128,) * 4
        m.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS = len(S.HOUSE_KEYPOINTS)
        cfg.TEST.KEYPOINT_OKS_SIGMAS = list(S.HOUSE_OKS_SIGMAS)
        m.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE = 0  # records carry no annotations (drawn in the mapper)
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_SIZE_TRAIN = (416, 448, 480, 512, 544, 576, 608)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 832
    cfg.INPUT.MIN_SIZE_TEST = 512
    cfg.INPUT.MAX_SIZE_TEST = 704
    cfg.INPUT.RANDOM_FLIP = "horizontal" if dataset == "shapes" else "none"
    cfg.DATASETS.TRAIN = (train_name,)
    cfg.DATASETS.TEST = (val_name,)
    cfg.DATALOADER.NUM_WORKERS = args.workers
    cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS = False  # every image has objects; records carry none
    cfg.SOLVER.IMS_PER_BATCH = args.batch
    cfg.SOLVER.BASE_LR = args.lr
    cfg.SOLVER.WARMUP_ITERS = args.warmup
    cfg.SOLVER.MAX_ITER = args.max_iter
    cfg.SOLVER.STEPS = (int(args.max_iter * 0.75), int(args.max_iter * 0.92))
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.SOLVER.AMP.ENABLED = bool(args.amp)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = args.seed
    cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg.OUTPUT_DIR = str(args.work)
    return cfg


def register(dataset: str, val_count: int, work: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    train_name, val_name = names(dataset)
    meta = S.metadata(dataset)
    if train_name not in DatasetCatalog.list():
        DatasetCatalog.register(train_name, lambda: S.detectron2_dicts(dataset, "train", TRAIN_IMAGES, annotations=False))
        MetadataCatalog.get(train_name).set(**meta)
    if val_name not in DatasetCatalog.list():
        json_path = S.write_coco(dataset, "val", val_count, work / "val", images=False)
        DatasetCatalog.register(val_name, lambda: S.detectron2_dicts(dataset, "val", val_count))
        MetadataCatalog.get(val_name).set(json_file=str(json_path), evaluator_type="coco", **meta)


def mapper_class():
    import detectron2.data.detection_utils as utils
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper

    class SyntheticMapper(DatasetMapper):
        """DatasetMapper that draws the image (and its annotations) from the record's seed."""

        def __call__(self, dataset_dict):
            d = copy.deepcopy(dataset_dict)
            image, anns = S.render(d["dataset"], d["index"], d["seed"])
            utils.check_image_size(d, image)
            aug_input = T.AugInput(image)
            transforms = self.augmentations(aug_input)
            image = aug_input.image
            image_shape = image.shape[:2]
            d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
            if not self.is_train:
                d.pop("annotations", None)
                return d
            d["annotations"] = S.d2_annotations(anns)
            self._transform_annotations(d, transforms, image_shape)
            return d

    return SyntheticMapper


class Budget:
    """Progress of a run in iterations and in seconds; the LR factor and the stop follow it."""

    def __init__(self, max_iter: int, seconds: float, warmup: int, warmup_factor: float = 0.001):
        self.max_iter, self.seconds, self.warmup, self.warmup_factor = max_iter, seconds, warmup, warmup_factor
        self.start = None
        self.decays: list[int] = []  # iterations at which the LR was divided by 10

    def progress(self, it: int) -> float:
        t = 0.0 if self.start is None else (time.perf_counter() - self.start) / self.seconds
        return max(it / self.max_iter, t)

    def factor(self, it: int) -> float:
        w = 1.0 if it >= self.warmup else self.warmup_factor + (1 - self.warmup_factor) * it / self.warmup
        p = self.progress(it)
        steps = int(p >= 0.75) + int(p >= 0.92)
        while len(self.decays) < steps:
            self.decays.append(it)
        return w * 0.1 ** len(self.decays)


def trainer_class(budget: Budget):
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.engine import DefaultTrainer, hooks
    from detectron2.utils.events import CommonMetricPrinter, EventStorage, JSONWriter

    Mapper = mapper_class()

    class Trainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=Mapper(cfg, True))

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            return build_detection_test_loader(cfg, dataset_name, mapper=Mapper(cfg, False))

        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            return evaluator(cfg, dataset_name)

        @classmethod
        def build_lr_scheduler(cls, cfg, optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, budget.factor)

        def build_writers(self):
            return [CommonMetricPrinter(self.max_iter), JSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.jsonl"))]

        def build_hooks(self):  # no periodic checkpoints, no eval (the saved fp16 model is evaluated)
            return [h for h in super().build_hooks() if not isinstance(h, (hooks.EvalHook, hooks.PeriodicCheckpointer))]

        def train(self):
            """TrainerBase.train, ending when the budget says so (hooks see the last iteration as such)."""
            self.iter = self.start_iter
            self.failed_at, self.snapshot = None, None
            with EventStorage(self.start_iter) as self.storage:
                try:
                    self.before_train()
                    budget.start = time.perf_counter()
                    for self.iter in range(self.start_iter, self.max_iter):
                        self.before_step()
                        try:
                            self.run_step()
                        except FloatingPointError:  # a non-finite loss: keep the last good weights
                            log.exception("training diverged at iteration %d", self.iter)
                            self.failed_at = self.iter
                            break
                        if budget.progress(self.iter + 1) >= 1.0:
                            self.max_iter = self.iter + 1
                        self.after_step()
                        if (self.iter + 1) % SNAPSHOT_PERIOD == 0:
                            self.snapshot = (self.iter + 1, {k: v.detach().to("cpu", copy=True)
                                                             for k, v in self.model.state_dict().items()})
                        if self.iter + 1 >= self.max_iter:
                            break
                    self.iter += 1
                finally:
                    self.after_train()

    return Trainer


def evaluator(cfg, dataset_name):
    from detectron2.evaluation import COCOEvaluator

    sigmas = cfg.TEST.KEYPOINT_OKS_SIGMAS if cfg.MODEL.KEYPOINT_ON else ()
    return COCOEvaluator(dataset_name, distributed=False, output_dir=None, use_fast_impl=False,
                         kpt_oks_sigmas=sigmas, allow_cached_coco=False)


def count_params(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    parts = {}
    for name, p in model.named_parameters():
        key = ".".join(name.split(".")[:2])
        parts[key] = parts.get(key, 0) + p.numel()
    return {"total": total, "parts": parts}


def half_state_dict(model) -> dict:
    """float16 copies of the floating tensors (fp32 kept where fp16 would overflow)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):  # FrozenBN has none (model-zoo checkpoints neither)
            continue
        v = v.detach().to("cpu")
        if v.is_floating_point():
            h = v.half()
            out[k] = h if torch.isfinite(h).all() else v.float()
        else:
            out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--out", type=Path, default=None, help="where model_final.pth, config.yaml, metrics.json go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default <out>/work)")
    ap.add_argument("--max-iter", type=int, default=3000)
    ap.add_argument("--train-seconds", type=float, default=360.0, help="time budget of the training loop")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--amp", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--val-count", type=int, default=200)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU, batch 2, 4 iterations, 0 workers, 4 val images")
    ap.add_argument("--count-params", action="store_true", help="build on CPU, print parameter counts, exit")
    args = ap.parse_args(argv)
    if args.smoke:
        args.cpu, args.batch, args.max_iter, args.workers, args.amp, args.val_count, args.warmup = True, 2, 4, 0, 0, 4, 2
    if not torch.cuda.is_available():
        args.cpu, args.amp = True, 0

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.evaluation import inference_on_dataset
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger

    setup_logger()
    setup_logger(name="train_small")
    spec = MODELS[args.model]
    dataset = spec["dataset"]

    if args.count_params:
        args.work = Path("/tmp")
        cfg = make_cfg(args.model, args)
        cfg.MODEL.DEVICE = "cpu"
        model = build_model(cfg)
        counts = count_params(model)
        fp16_mb = sum(v.numel() * (2 if v.is_floating_point() else v.element_size())
                      for v in half_state_dict(model).values()) / 1e6
        print(json.dumps({"model": args.model, "params": counts["total"], "fp16_MB": round(fp16_mb, 2),
                          "parts": counts["parts"]}, indent=1))
        return 0

    if args.out is None:
        ap.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or args.out / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    register(dataset, args.val_count, args.work)
    cfg = make_cfg(args.model, args)
    budget = Budget(args.max_iter, args.train_seconds, args.warmup)
    Trainer = trainer_class(budget)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    params = count_params(trainer.model)["total"]
    log.info("model %s: %d parameters, device %s, AMP %s", args.model, params, cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED)
    t_train = time.time()
    trainer.train()
    train_s = time.time() - t_train
    iters = trainer.iter
    diverged = trainer.failed_at
    if diverged is not None:
        if trainer.snapshot is None:
            raise SystemExit(f"training diverged at iteration {diverged} before any snapshot")
        iters, state = trainer.snapshot
        trainer.model.load_state_dict(state)
        log.warning("diverged at iteration %d: using the weights of iteration %d", diverged, iters)
    log.info("trained %d iterations in %.1f s (%.3f s/it); LR decays at %s", iters, train_s, train_s / max(iters, 1), budget.decays)

    # FrozenBN with the learned statistics; fp16 state dict; the config as Detectron2 dumps it
    model = trainer.model
    model.eval()
    model = FrozenBatchNorm2d.convert_frozen_batchnorm(model)
    out_cfg = cfg.clone()
    out_cfg.defrost()
    out_cfg.MODEL.RESNETS.NORM = "FrozenBN"
    out_cfg.MODEL.WEIGHTS = ""
    out_cfg.SOLVER.MAX_ITER = int(iters)
    out_cfg.SOLVER.STEPS = tuple(int(i) for i in budget.decays) or (int(iters),)
    out_cfg.OUTPUT_DIR = "./output"
    weights = args.out / "model_final.pth"
    torch.save({"model": half_state_dict(model)}, weights)
    (args.out / "config.yaml").write_text(out_cfg.dump())
    del trainer, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # reload the saved files through Detectron2 and evaluate them on the held-out val split
    ecfg = get_cfg()
    ecfg.merge_from_file(str(args.out / "config.yaml"))
    ecfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    if args.smoke:  # exercise the evaluator with (meaningless) detections
        ecfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build_model(ecfg)
    DetectionCheckpointer(model).load(str(weights))
    model.eval()
    from detectron2.data import build_detection_test_loader

    loader = build_detection_test_loader(ecfg, ecfg.DATASETS.TEST[0], mapper=mapper_class()(ecfg, False),
                                         num_workers=min(args.workers, 8))
    t_eval = time.time()
    results = inference_on_dataset(model, loader, evaluator(ecfg, ecfg.DATASETS.TEST[0]))
    eval_s = time.time() - t_eval
    doc = {
        "model": args.model,
        "dataset": f"d2build.synthetic {dataset}",
        "val_split": {"name": ecfg.DATASETS.TEST[0], "images": args.val_count, "seeds": "seed_for(dataset, 'val', 0..N-1)"},
        "evaluator": "detectron2 COCOEvaluator (pycocotools), on the saved fp16 checkpoint loaded into fp32",
        "input": {"min_size_test": ecfg.INPUT.MIN_SIZE_TEST, "max_size_test": ecfg.INPUT.MAX_SIZE_TEST},
        "results": {task: {k: (None if v != v else round(float(v), 3)) for k, v in res.items()} for task, res in results.items()},
        "training": {"iterations": int(iters), "seconds": round(train_s, 1), "seconds_per_iteration": round(train_s / max(iters, 1), 4),
                     "lr_decays_at": budget.decays, "batch": args.batch, "base_lr": args.lr, "amp": bool(args.amp),
                     "diverged_at": diverged,
                     "device": torch.cuda.get_device_name() if cfg.MODEL.DEVICE == "cuda" else "cpu",
                     "torch": torch.__version__},
        "params": int(params),
        "checkpoint_bytes": weights.stat().st_size,
        "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.time() - t0, 1),
    }
    (args.out / "metrics.json").write_text(json.dumps(doc, indent=1) + "\n")
    log.info("metrics: %s", json.dumps(doc["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
