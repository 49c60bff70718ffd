#!/usr/bin/env python
"""Train a small LazyConfig Mask R-CNN from scratch on d2build.synthetic shapes, with Detectron2's LazyConfig loop.

    python tools/train_lazy_small.py --out models/shapes_lazy_mask_rcnn                 # GPU, ~6 min of training
    python tools/train_lazy_small.py --out /tmp/smoke --iters 5                          # CPU smoke test
    python tools/train_lazy_small.py --count-params                                      # build on CPU, count

What a user of Detectron2's LazyConfig API does (the pattern of detectron2's tools/lazyconfig_train_net.py):
a LazyConfig (`model`, `dataloader`, `optimizer`, `lr_multiplier`, `train`) is built from the model zoo's
LSJ baseline (`new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py`) with a smaller model, dumped with
`LazyConfig.save` as `config.yaml` before training (as `default_setup` does), then `instantiate` builds the
model, optimizer and train loader; `AMPTrainer` (GPU) or `SimpleTrainer` (CPU) runs with Detectron2's hooks
(IterationTimer, LRScheduler, PeriodicWriter); `DetectionCheckpointer` saves `model_final.pth`. The saved
files are then loaded back the way a user would (`LazyConfig.load(config.yaml)`, `instantiate`,
`DetectionCheckpointer.load`) and evaluated with the config's own test loader and COCOEvaluator on the
held-out val split: `metrics.json`.

The model keeps the LSJ structure the new d2build code must handle, at a small size: ResNet with BasicBlocks
(2-2-2-2, widths 32-64-128-256, BatchNorm, trained from scratch: freeze_at 0), FPN (BN, 96 channels), RPN head
with two convs (`conv_dims [-1, -1]`), the "4conv1fc" box head (four 3x3 convs with BatchNorm, one FC), the
mask head's four convs with BatchNorm. Norms stay BatchNorm (eval mode: running statistics), as the LSJ
models' SyncBN is at inference; `conv_norm="BN"` is a string, so the dump loads (the zoo LSJ configs' lambda
does not). Large-scale jitter at 512: ResizeScale(0.5-1.5) + FixedSizeCrop(512) + flip for training (masks as bitmaps through the crop);
ResizeShortestEdge(512, 704) for testing, as the yacs shapes model.

The schedule is budgeted in time as well as iterations (as tools/train_small.py): progress = max(iter /
--max-iter, seconds / --train-seconds); linear warm-up, LR x0.1 at progress 0.75 and 0.92, stop at 1. The
saved state dict is float16 (`{"model": ...}`; DetectionCheckpointer copies it into the fp32 model).
`--iters N` runs exactly N iterations (smoke tests); without a GPU the run is CPU, batch 2, no workers.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from d2build import synthetic as S  # noqa: E402  (numpy + cv2 only)
from detectron2.data import DatasetMapper  # noqa: E402

DATASET = "shapes"
TRAIN_NAME, VAL_NAME = "synthetic_shapes_train", "synthetic_shapes_val"
TRAIN_IMAGES = 100_000  # records in the train split (seeds only; the mapper draws each image)
BASE = "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
IMAGE_SIZE = 512
WIDTHS = (32, 64, 128, 256)  # res2..res5 output channels
FPN_CHANNELS = 96
HEAD_CONV = 96
BOX_FC = 160

log = logging.getLogger("train_lazy_small")


# ------------------------------------------------------------------ data (seeds in records, drawn in the mapper)

def register(val_count: int, work: Path) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    meta = S.metadata(DATASET)
    if TRAIN_NAME not in DatasetCatalog.list():
        DatasetCatalog.register(TRAIN_NAME, lambda: S.detectron2_dicts(DATASET, "train", TRAIN_IMAGES, annotations=False))
        MetadataCatalog.get(TRAIN_NAME).set(**meta)
    if VAL_NAME not in DatasetCatalog.list():
        json_path = S.write_coco(DATASET, "val", val_count, work / "val", images=False)
        DatasetCatalog.register(VAL_NAME, lambda: S.detectron2_dicts(DATASET, "val", val_count))
        MetadataCatalog.get(VAL_NAME).set(json_file=str(json_path), evaluator_type="coco", **meta)


class SyntheticMapper(DatasetMapper):
    """DatasetMapper that draws the image (and its polygons) from the record's seed instead of reading a file."""

    def __call__(self, dataset_dict):
        import detectron2.data.detection_utils as utils
        import detectron2.data.transforms as T

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
        h, w = dataset_dict["height"], dataset_dict["width"]
        d["annotations"] = [{**a, "segmentation": _rle(a["segmentation"], h, w)} for a in S.d2_annotations(anns)]
        self._transform_annotations(d, transforms, image_shape)
        return d


def _rle(polygons, h: int, w: int) -> dict:
    """Polygons as one run-length-encoded mask: the crop of large-scale jitter then transforms it as an image
    (fvcore crops polygons with shapely, which the GPU machine does not have)."""
    from pycocotools import mask as mask_util

    return mask_util.merge(mask_util.frPyObjects([list(map(float, p)) for p in polygons], h, w))


# ------------------------------------------------------------------ the LazyConfig

def make_config(args):
    """The zoo's LSJ baseline, made small and pointed at the synthetic data (what a user's .py would say)."""
    import detectron2.data.transforms as T
    from detectron2 import model_zoo
    from detectron2.config import LazyCall as L
    from detectron2.data import build_detection_test_loader, build_detection_train_loader, get_detection_dataset_dicts
    from detectron2.evaluation import COCOEvaluator
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import BasicStem, ResNet
    from detectron2.modeling.backbone.resnet import BasicBlock
    from detectron2.solver import WarmupParamScheduler
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    cfg = model_zoo.get_config(BASE)
    m = cfg.model
    stages = []
    in_ch = WIDTHS[0]
    for i, out_ch in enumerate(WIDTHS):
        stages.append(L(ResNet.make_stage)(block_class=BasicBlock, num_blocks=2, in_channels=in_ch, out_channels=out_ch,
                                           stride_per_block=[1 if i == 0 else 2, 1], norm="BN"))
        in_ch = out_ch
    m.backbone.bottom_up = L(ResNet)(stem=L(BasicStem)(in_channels=3, out_channels=WIDTHS[0], norm="BN"),
                                     stages=stages, out_features=["res2", "res3", "res4", "res5"], freeze_at=0)
    m.backbone.out_channels = FPN_CHANNELS
    m.backbone.norm = "BN"
    m.proposal_generator.head.in_channels = FPN_CHANNELS
    heads = m.roi_heads
    heads.num_classes = len(S.CLASSES[DATASET])
    heads.box_head.input_shape = ShapeSpec(channels=FPN_CHANNELS, height=7, width=7)
    heads.box_head.conv_dims = [HEAD_CONV] * 4
    heads.box_head.fc_dims = [BOX_FC]
    heads.box_head.conv_norm = "BN"  # the LSJ config's lambda (NaiveSyncBatchNorm) cannot be dumped
    heads.box_predictor.input_shape = ShapeSpec(channels=BOX_FC)
    heads.mask_head.input_shape = ShapeSpec(channels=FPN_CHANNELS, width=14, height=14)
    heads.mask_head.conv_dims = [HEAD_CONV] * 4
    heads.mask_head.conv_norm = "BN"
    m.pixel_mean = [103.530, 116.280, 123.675]
    m.pixel_std = [57.375, 57.120, 58.395]
    m.input_format = "BGR"

    cfg.dataloader.train = L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names=TRAIN_NAME, filter_empty=False),
        mapper=L(SyntheticMapper)(
            is_train=True,
            augmentations=[L(T.ResizeScale)(min_scale=0.5, max_scale=1.5, target_height=IMAGE_SIZE,
                                            target_width=IMAGE_SIZE),
                           # seg_pad_value 0: the default 255 (semantic "ignore") would pad each instance's
                           # bitmask with 1s, and recompute_boxes would stretch its box over the padding
                           L(T.FixedSizeCrop)(crop_size=(IMAGE_SIZE, IMAGE_SIZE), seg_pad_value=0),
                           L(T.RandomFlip)(horizontal=True)],
            image_format="BGR", use_instance_mask=True, instance_mask_format="bitmask", recompute_boxes=True),
        total_batch_size=args.batch, num_workers=args.workers)
    cfg.dataloader.test = L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names=VAL_NAME, filter_empty=False),
        mapper=L(SyntheticMapper)(is_train=False,
                                  augmentations=[L(T.ResizeShortestEdge)(short_edge_length=512, max_size=704)],
                                  image_format="BGR"),
        num_workers=min(args.workers, 8))
    cfg.dataloader.evaluator = L(COCOEvaluator)(dataset_name=VAL_NAME, distributed=False, output_dir=None,
                                                use_fast_impl=False, allow_cached_coco=False)
    # the nominal schedule (the loop follows its shape in time as well: Budget)
    cfg.lr_multiplier = L(WarmupParamScheduler)(
        scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], num_updates=args.max_iter,
                                             milestones=[int(args.max_iter * 0.75), int(args.max_iter * 0.92)]),
        warmup_length=args.warmup / args.max_iter, warmup_factor=0.001)
    cfg.optimizer.lr = args.lr
    cfg.optimizer.weight_decay = 4e-5
    cfg.train.device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg.train.amp.enabled = bool(args.amp)
    cfg.train.max_iter = args.max_iter
    cfg.train.init_checkpoint = ""
    cfg.train.output_dir = "./output"
    cfg.train.seed = args.seed
    cfg.train.checkpointer = dict(period=10**9, max_to_keep=1)
    cfg.train.eval_period = 0
    cfg.train.log_period = 20
    cfg.train.ddp = dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False)
    return cfg


# ------------------------------------------------------------------ the time-budgeted schedule

class Budget:
    """Progress in iterations and in seconds; the LR factor and the stop follow it."""

    def __init__(self, max_iter: int, seconds: float, warmup: int, exact: bool, warmup_factor: float = 0.001):
        self.max_iter, self.seconds, self.warmup, self.exact = max_iter, seconds, warmup, exact
        self.warmup_factor = warmup_factor
        self.start: float | None = None
        self.decays: list[int] = []

    def progress(self, it: int) -> float:
        if self.exact or self.start is None:
            return it / self.max_iter
        return max(it / self.max_iter, (time.perf_counter() - self.start) / self.seconds)

    def factor(self, it: int) -> float:
        w = 1.0 if it >= self.warmup else self.warmup_factor + (1 - self.warmup_factor) * it / self.warmup
        p = self.progress(it)
        steps = int(p >= 0.75) + int(p >= 0.92)
        while len(self.decays) < steps:
            self.decays.append(it)
        return w * 0.1 ** len(self.decays)


def trainer_class(base, budget: Budget):
    from detectron2.utils.events import EventStorage

    class BudgetTrainer(base):
        """AMPTrainer / SimpleTrainer whose loop ends when the budget says so (hooks see that iteration as the last)."""

        def train(self, start_iter: int, max_iter: int) -> None:
            self.iter = self.start_iter = start_iter
            self.max_iter = max_iter
            with EventStorage(start_iter) as self.storage:
                try:
                    self.before_train()
                    budget.start = time.perf_counter()
                    for self.iter in range(start_iter, max_iter):
                        self.before_step()
                        self.run_step()
                        if budget.progress(self.iter + 1) >= 1.0:
                            self.max_iter = self.iter + 1
                        self.after_step()
                        if self.iter + 1 >= self.max_iter:
                            break
                    self.iter += 1
                finally:
                    self.after_train()

    return BudgetTrainer


# ------------------------------------------------------------------ saving, evaluating

def half_state_dict(model) -> dict:
    """float16 copies of the floating tensors (fp32 kept where fp16 would overflow); BN's counters dropped."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        v = v.detach().to("cpu")
        if v.is_floating_point():
            h = v.half()
            out[k] = h if torch.isfinite(h).all() else v.float()
        else:
            out[k] = v
    return out


def evaluate(out: Path, device: str, smoke: bool) -> tuple[dict, float]:
    """Load config.yaml and model_final.pth as a user would, and run the config's own test loader and evaluator."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from detectron2.evaluation import inference_on_dataset

    cfg = LazyConfig.load(str(out / "config.yaml"))
    if smoke:  # a few-iteration model scores nothing above 0.05: let the evaluator see detections anyway
        cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    model = instantiate(cfg.model).to(device).eval()
    DetectionCheckpointer(model).load(str(out / "model_final.pth"))
    t = time.time()
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    return results, time.time() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="where config.yaml, model_final.pth, metrics.json go")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default <out>/work)")
    ap.add_argument("--max-iter", type=int, default=4000)
    ap.add_argument("--train-seconds", type=float, default=360.0, help="time budget of the training loop")
    ap.add_argument("--iters", type=int, default=None, help="run exactly this many iterations (no time budget)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--amp", type=int, default=1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--val-count", type=int, default=200)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--count-params", action="store_true", help="build on CPU, print parameter counts, exit")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        args.cpu = True
    if args.cpu:
        args.amp, args.batch, args.workers = 0, min(args.batch, 2), 0
    if args.iters is not None:
        args.max_iter = args.iters
        args.warmup = min(args.warmup, max(1, args.iters // 2))
        if args.cpu:
            args.val_count = min(args.val_count, 4)

    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
    from detectron2.utils.events import CommonMetricPrinter, JSONWriter
    from detectron2.utils.logger import setup_logger

    setup_logger()
    setup_logger(name="train_lazy_small")
    if args.count_params:
        cfg = make_config(args)
        model = instantiate(cfg.model)
        half = half_state_dict(model)
        print(json.dumps({"params": sum(p.numel() for p in model.parameters()),
                          "fp16_MB": round(sum(v.numel() * v.element_size() for v in half.values()) / 1e6, 2)}))
        return 0
    if args.out is None:
        ap.error("--out is required")
    t0 = time.time()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    register(args.val_count, work)
    cfg = make_config(args)
    LazyConfig.save(cfg, str(out / "config.yaml"))  # as default_setup does, before training
    torch.manual_seed(args.seed)

    model = instantiate(cfg.model).to(cfg.train.device)
    params = sum(p.numel() for p in model.parameters())
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    loader = instantiate(cfg.dataloader.train)
    budget = Budget(args.max_iter, args.train_seconds, args.warmup, exact=args.iters is not None)
    Trainer = trainer_class(AMPTrainer if cfg.train.amp.enabled else SimpleTrainer, budget)
    trainer = Trainer(model, loader, optimizer)
    writers = [CommonMetricPrinter(args.max_iter), JSONWriter(str(work / "metrics.jsonl"))]  # no TensorBoard
    trainer.register_hooks([
        hooks.IterationTimer(),
        hooks.LRScheduler(optimizer=optimizer, scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, budget.factor)),
        hooks.PeriodicWriter(writers, period=cfg.train.log_period),
    ])
    log.info("model: %d parameters, device %s, AMP %s, batch %d", params, cfg.train.device, cfg.train.amp.enabled,
             args.batch)
    t_train = time.time()
    trainer.train(0, args.max_iter)
    train_s = time.time() - t_train
    iters = trainer.iter
    log.info("trained %d iterations in %.1f s (%.3f s/it); LR decays at %s", iters, train_s, train_s / max(iters, 1),
             budget.decays)

    model.eval()
    DetectionCheckpointer(model, save_dir=str(work)).save("model_fp32")  # Detectron2's own checkpoint format
    torch.save({"model": half_state_dict(model)}, out / "model_final.pth")
    del trainer, model, optimizer, loader
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    results, eval_s = evaluate(out, cfg.train.device, smoke=args.iters is not None)
    doc = {
        "model": "shapes_lazy_mask_rcnn",
        "config": f"LazyConfig from the zoo's {BASE} (tools/train_lazy_small.py make_config), dumped by LazyConfig.save",
        "dataset": f"d2build.synthetic {DATASET}",
        "val_split": {"name": VAL_NAME, "images": args.val_count, "seeds": "seed_for(dataset, 'val', 0..N-1)"},
        "evaluator": "detectron2 COCOEvaluator (pycocotools) through the config's dataloader.test and "
                     "dataloader.evaluator, on the saved fp16 checkpoint loaded into fp32",
        "input": {"test": "ResizeShortestEdge(512, 704)", "train": f"ResizeScale(0.5-1.5) + FixedSizeCrop({IMAGE_SIZE})"},
        "results": {task: {k: (None if v != v else round(float(v), 3)) for k, v in res.items()}
                    for task, res in results.items()},
        "training": {"iterations": int(iters), "seconds": round(train_s, 1),
                     "seconds_per_iteration": round(train_s / max(iters, 1), 4), "lr_decays_at": budget.decays,
                     "batch": args.batch, "base_lr": args.lr, "amp": bool(args.amp),
                     "device": torch.cuda.get_device_name() if cfg.train.device == "cuda" else "cpu",
                     "torch": torch.__version__},
        "params": int(params),
        "checkpoint_bytes": (out / "model_final.pth").stat().st_size,
        "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.time() - t0, 1),
    }
    (out / "metrics.json").write_text(json.dumps(doc, indent=1) + "\n")
    log.info("metrics: %s", json.dumps(doc["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
