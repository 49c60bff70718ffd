"""d2build deploy --out DIR [--backend ...] [--name NAME] KEY=VALUE ...: a self-describing bundle.

Runs the recipe's DAG as a run would (cached stages are reused, what is missing is built) through
the engine build and the engine check, then writes `DIR/<recipe>-<H>x<W>-<precision>-<ops>-<key12>/`
(d2build/deploy/bundle.py): the precision graph, the engine when one was built and passed its
check, model.json, verify's (and the check's) report and numbers, and a Triton model repository.
A bundle of the same content already there is left as it is. It refuses to bundle a graph whose
verify failed or an engine whose check failed, and says where the report is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

SUMMARY = "write a self-describing bundle (graph, engine, model.json, Triton repository) for a recipe"
log = logging.getLogger("d2build")
BACKENDS = ("auto", "tensorrt", "onnxruntime", "reference")
#: overrides of where and how this machine runs, not of what is built: not recorded in model.json (nor keyed)
LOCAL_KEYS = ("cache.", "run.", "runtime.", "hydra.")


class DeployRefused(RuntimeError):
    """Deploy will not write a bundle (a failed stage, a backend that cannot be served); says why."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2build deploy", description=__doc__.split("\n\n")[0],
                                epilog="KEY=VALUE overrides pick the recipe and its settings as for a run "
                                       "(recipe=..., model.*, surgery.ops=standard, precision=..., ...).")
    p.add_argument("--out", required=True, help="folder the bundle folder is written into")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="what the bundle must be able to run on: tensorrt (an engine is required: fails where "
                        "none can be built), onnxruntime (needs surgery.ops=standard), reference (the plugin "
                        "graph on CPU), auto (whatever was built; default). The bundle is loaded with it once "
                        "written, as a smoke test")
    p.add_argument("--name", help="Triton model name prefix (default: the recipe name)")
    p.add_argument("--run-dir", help="where run.json and failed-stage evidence go "
                                     "(default outputs/deploy-runs/<date>/<time>)")
    return p


def main(argv: list[str]) -> int:
    from d2build.commands import _runtime
    from d2build.commands._common import compose_or_report

    p = parser()
    args = _runtime.parse(p, argv)
    if args is None:
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    recipe = compose_or_report(args.overrides)
    if recipe is not None:
        from d2build import console

        console.configure(recipe.run.verbose)
    if recipe is None:
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else (Path("outputs") / "deploy-runs" / time.strftime("%Y-%m-%d")
                                                       / time.strftime("%H-%M-%S"))
    from d2build.commands._common import print_problems
    from d2build.recipe import RecipeError

    try:
        path, status, bundle_doc = deploy(recipe, Path(args.out), run_dir, args.overrides, backend=args.backend,
                                          name=args.name)
    except DeployRefused as e:
        print(f"d2build deploy: {e}", file=sys.stderr)
        return 1
    except RecipeError as e:  # a stage's preflight (inputs the schema cannot check)
        print_problems(e)
        return 2
    say = {"written": "wrote", "unchanged": "unchanged (same content already there):", "replaced": "rewrote"}[status]
    log.info("deploy: %s %s", say, path)
    engine = bundle_doc.get("engine")
    log.info("deploy: %s; graph %s (%s); engine %s; Triton repository %s", bundle_doc["model"]["family"],
             bundle_doc["graph"]["file"], bundle_doc["graph"]["flavour"],
             f"{engine['file']} (check {bundle_doc['check'].get('status')})" if engine
             else f"none ({bundle_doc['check'].get('reason', 'not built')})", path / "triton")
    log.info("deploy: run it with `python %s IMAGE...` (numpy, Pillow and one backend); Triton (%s): "
             "`d2build serve %s`, or see %s", path / "detect.py", bundle_doc["triton"]["model"], path,
             path / "triton" / "README.md")
    return 0


def _check_backend(recipe, backend: str) -> None:
    from d2build.deploy.triton import TritonChoiceError, resolve_model

    ops = recipe.surgery.ops
    try:  # the engine is not known yet: a choice that needs a standard-op graph is refused now, before any build
        resolve_model(recipe.deploy.triton.model, ops, has_engine=False)
    except TritonChoiceError as e:
        raise DeployRefused(str(e)) from None
    if backend == "onnxruntime" and ops != "standard":
        raise DeployRefused("--backend onnxruntime serves standard-op graphs; add surgery.ops=standard "
                            "(this recipe's graph has TensorRT plugin nodes)")
    if backend == "tensorrt":
        from d2build.backends import tensorrt

        reason = tensorrt.skip_reason(tensorrt.environment(recipe.build.device))
        if reason:
            raise DeployRefused(f"--backend tensorrt needs an engine, and none can be built here: {reason}. "
                                "Deploy with --backend auto (graph only) here, or where TensorRT and the GPU are")


def _results(recipe, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Every stage's result through the engine check."""
    from d2build.runner import execute

    return {r.name: r for r in execute(recipe, run_dir, overrides, until="check")}


def deploy(recipe, out: Path, run_dir: Path, overrides: list[str], *, backend: str = "auto",
           name: str | None = None) -> tuple[Path, str, dict[str, Any]]:
    """Build what is missing, refuse what failed, write the bundle; (path, status, model.json)."""
    from d2build import detectron
    from d2build.deploy import bundle as b
    from d2build.recipe import ModelSlice
    from d2build.deploy.triton import sanitize

    _check_backend(recipe, backend)
    results = _results(recipe, run_dir, overrides)
    for stage in ("weights", "export", "surgery", "calibration", "precision"):
        r = results.get(stage)
        if r is not None and r.status == "failed":
            raise DeployRefused(f"stage {stage} failed: {(r.reason or '').splitlines()[0]}")
    verify = results["verify"]
    if verify.status != "built" and verify.status != "hit":
        where = f"; report: {verify.dir}/report.md" if verify.dir else ""
        raise DeployRefused(f"verify {verify.status}: {(verify.reason or '').splitlines()[0]}{where}. "
                            "A graph that does not reproduce Detectron2 is not bundled")
    build, check = results["build"], results["check"]
    engine = None
    check_doc: dict[str, Any]
    if build.status in ("built", "hit"):
        if check.status == "failed":
            where = f"{check.dir}/report.md" if check.dir else f"{run_dir}/run.json"
            raise DeployRefused(f"the engine failed its check ({(check.reason or '').splitlines()[0]}); it is not "
                                f"bundled. Report: {where}")
        if check.status not in ("built", "hit"):
            raise DeployRefused(f"the engine was not checked ({check.reason}); it is not bundled unchecked")
        engine = Path(build.dir) / "engine.plan"
        check_doc = {"status": "passed", "summary": check.info.get("summary")}
    else:
        if backend == "tensorrt":
            raise DeployRefused(f"--backend tensorrt, but the engine build {build.status}: {build.reason}")
        check_doc = {"status": "skipped", "reason": build.reason or "no engine was built"}
    reports = {"verify/report.md": Path(verify.dir) / "report.md", "verify/metrics.json": Path(verify.dir) / "metrics.json"}
    if engine is not None:
        reports.update({"check/report.md": Path(check.dir) / "report.md",
                        "check/metrics.json": Path(check.dir) / "metrics.json"})
    d = recipe.to_dict()
    h, w = recipe.model.input
    keys = {n: r.key for n, r in results.items() if r.status in ("built", "hit")}
    src = b.BundleSource(
        name=f"{sanitize(recipe.name)}-{h}x{w}-{recipe.precision.mode}-{recipe.surgery.ops}",
        graph=Path(results["precision"].dir) / "model.onnx",
        info=detectron.model_info(ModelSlice.of(recipe)),
        recipe={"name": recipe.name, "file": recipe.source, "overrides": [o for o in overrides if not o.lstrip("+~")
                                                                          .startswith(LOCAL_KEYS)],
                "config": {k: v for k, v in d.items() if k not in ("cache", "run", "runtime")}},
        keys=keys,
        postprocess={"score_threshold": recipe.surgery.nms.score_threshold,
                     "iou_threshold": recipe.surgery.nms.iou_threshold,
                     "max_detections": recipe.surgery.nms.max_detections,
                     "applied_in_graph": "score_threshold, iou_threshold and max_detections are the final NMS's",
                     "display_score_threshold": recipe.runtime.score_threshold},
        engine=engine,
        engine_facts=build.info if engine is not None else None,
        reports=reports,
        verify=verify.info.get("summary"),
        check=check_doc,
        triton_prefix=sanitize(name or recipe.name),
        triton_model=recipe.deploy.triton.model,
    )
    path, status = b.write_bundle(out, src, say=lambda m: log.info("deploy: %s", m))
    if status == "unchanged":  # intact (every digest checked) and smoke-tested when it was written
        return path, status, json.loads((path / b.MODEL_JSON).read_text())
    smoke = "auto" if backend == "auto" else backend
    try:
        model, bundle = b.load_bundle(path, smoke, device=recipe.build.device)
        from d2build import photos

        photo = photos.load(photos.list_images(recipe.verify.images, 1)[0])
        det, _, seconds = model.detect(photo.bgr)
        log.info("deploy: loaded with backend %s: %d detections on %s in %.2f s", bundle.backend, len(det),
                 photo.name, seconds)
    except b.BundleError as e:
        raise DeployRefused(f"the bundle was written but does not load: {e}") from None
    return path, status, json.loads((path / b.MODEL_JSON).read_text())
