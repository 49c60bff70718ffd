"""How exactly does the TensorRT-ready graph reproduce Detectron2's proposals and detections?

For each photograph: Detectron2's RPN proposals (boxes in order, objectness) vs the graph's
EfficientNMS_TRT #1 outputs (run by the reference executor), then the final detections. Writes a
JSON and prints a table. Usage (after a run has cached the stages for this input size):

    .venv/bin/python bench/rpn_exactness.py model.input=[1344,1344] model.weights=random
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch


def main(overrides: list[str]) -> None:
    from d2build import detectron, photos
    from d2build.cache import Cache
    from d2build.compose import compose
    from d2build.families import builder
    from d2build.processing import letterbox
    from d2build.reference import ReferenceSession
    from d2build.runner import plan
    from d2build.stages.weights import load_state

    recipe = compose(overrides)
    cache = Cache(recipe.cache.dir)
    arts = {p.name: cache.lookup(p.stage.kind, p.key) for p in plan(recipe, cache)}
    if not arts["surgery"]:
        sys.exit("run d2build first with the same overrides (--until surgery) so the graph is cached")
    fam = builder(recipe.model.family)
    cfg = detectron.load_cfg(recipe.model.config, fam.eager_overrides(recipe.surgery))
    model = detectron.build_model(cfg, load_state(arts["weights"]))
    graph = onnx.load(str(arts["surgery"].path("model.onnx")))
    extra = ["d2build/rpn_nms_out1", "d2build/rpn_nms_out2"]
    graph.graph.output.extend([onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra])
    session = ReferenceSession(graph)
    rows = []
    for name in photos.BUNDLED[:4]:
        chw, lb = letterbox(photos.bundled(name).bgr, recipe.model.input, cfg.MODEL.PIXEL_MEAN)
        with torch.no_grad():
            images = model.preprocess_image([{"image": torch.as_tensor(chw)}])
            feats = model.backbone(images.tensor)
            props, _ = model.proposal_generator(images, feats)
        ref_boxes = props[0].proposal_boxes.tensor.numpy()
        ref_logits = props[0].objectness_logits.numpy()
        out = session.run({"input_tensor": chw[None]}, output_names=extra)
        scores = out[extra[1]][0]
        valid = scores > 0
        boxes = out[extra[0]][0][valid]
        n = min(len(boxes), len(ref_boxes))
        same_order = int(np.sum(np.all(np.abs(boxes[:n] - ref_boxes[:n]) <= 1e-3, axis=1)))
        from d2build.compare import box_iou

        iou = box_iou(ref_boxes, boxes) if len(boxes) and len(ref_boxes) else np.zeros((len(ref_boxes), 1))
        best = iou.max(axis=1) if iou.size else np.zeros(len(ref_boxes))
        missing = np.flatnonzero(best < 0.999)
        rows.append({
            "image": name, "detectron2_proposals": len(ref_boxes), "graph_proposals": int(valid.sum()),
            "same_position_and_box": same_order, "common_boxes": int((best >= 0.999).sum()),
            "missing_ranks": missing[:10].tolist(),
            "missing_logits": ref_logits[missing[:5]].round(4).tolist(),
            "max_abs_box_diff_first_n": float(np.abs(boxes[:n] - ref_boxes[:n]).max()) if n else 0.0,
            "logit_vs_score_max_diff": float(np.abs(1 / (1 + np.exp(-ref_logits[:n])) - scores[valid][:n]).max()),
        })
        print(rows[-1])
    out_path = Path("outputs/bench") / f"rpn_exactness_{recipe.model.input[0]}x{recipe.model.input[1]}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
