"""d2build deploy: bundles (round trip, digests, format version, bad input), the Triton repository.

One cheap model for everything (Mask R-CNN R50-FPN, random weights, 320x320, verify on one
photograph), deployed once per session into a shared folder by `ensure_bundle` (test_check.py and
test_runtime_no_torch.py use the same bundles): the plugin graph (reference backend) and, for the
ONNX Runtime path and its Triton model, the standard-op graph.

Triton configs (of every deploy.triton.model variant, and of the repository `d2build serve` hands the
server) are validated with Triton's own schema: the `inference.ModelConfig` message of
tritonclient's model_config_pb2.py, loaded by path (tritonclient's package __init__ needs grpcio,
and its [grpc] extra pins protobuf < 7, which this environment is past; the generated module itself
only needs protobuf). The Python-backend model runs in a subprocess under a stand-in of
`triton_python_backend_utils` (written below; Triton's module exists only inside its server), with
torch, Detectron2 and Hydra unimportable, from the repository folder exactly as written (its
vendored d2build modules, not the installed ones). tests/test_serve.py serves the standard bundle
with a real tritonserver.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SMALL_320, d2build, published

SMALL = [*SMALL_320, "verify.count=1"]
BLOCKED = ("torch", "torchvision", "detectron2", "hydra", "omegaconf")
SITECUSTOMIZE = f'''
"""Test-only: make {", ".join(BLOCKED)} unimportable in this process (the deploy runtime must not need them)."""
import importlib.abc, sys
BLOCKED = {set(BLOCKED)!r}
class _Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is blocked in this test: the deploy runtime must not import it")
        return None
sys.meta_path.insert(0, _Blocked())
'''


# ------------------------------------------------------------------ shared bundles


def bundles_root(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "deploy-bundles"


def ensure_bundle(cache: Path, root: Path, ops: str = "plugins") -> Path:
    """The session's 320x320 bundle for `surgery.ops=ops`, deployed on first use (later calls find it)."""
    out = root / ops
    found = sorted(p for p in out.glob("mask_rcnn_r50-*") if (p / "manifest.json").is_file()) if out.exists() else []
    if found:
        return found[0]
    if not (published(cache, "weights") and published(cache, "export")):
        d2build(SMALL_320, cache, root / f"seed-{ops}", until="export")
    proc = deploy_command(["--out", str(out), "--run-dir", str(root / f"run-{ops}"), *SMALL, f"surgery.ops={ops}"],
                          cache)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    found = sorted(out.glob("mask_rcnn_r50-*"))
    assert len(found) == 1, found
    return found[0]


def deploy_command(args: list[str], cache: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2build", "deploy", *args, f"cache.dir={cache}"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def no_torch_env(tmp: Path, *extra: Path) -> dict[str, str]:
    """Environment for a subprocess in which importing torch, Detectron2, Hydra, ... fails."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(tmp), *(str(p) for p in extra), str(REPO)])
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="session")
def plugin_bundle(cache_320_dir, tmp_path_factory) -> Path:
    return ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "plugins")


@pytest.fixture(scope="session")
def standard_bundle(cache_320_dir, tmp_path_factory) -> Path:
    return ensure_bundle(cache_320_dir, bundles_root(tmp_path_factory), "standard")


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def resign(bundle: Path, rel: str) -> None:
    """Update manifest.json for an edited file (as a writer of that content would have)."""
    from d2build.deploy.bundle import MANIFEST, sha256_file

    mf = json.loads((bundle / MANIFEST).read_text())
    mf["files"][rel] = {"sha256": sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}
    (bundle / MANIFEST).write_text(json.dumps(mf))


def edit_model_json(bundle: Path, change) -> None:
    doc = json.loads((bundle / "model.json").read_text())
    change(doc)
    (bundle / "model.json").write_text(json.dumps(doc))
    resign(bundle, "model.json")


def photo_png(tmp: Path, name: str = "astronaut") -> Path:
    from PIL import Image

    from d2build import photos

    p = tmp / f"{name}.png"
    Image.fromarray(photos.bundled(name).bgr[:, :, ::-1]).save(p)
    return p


# ------------------------------------------------------------------ the bundle


def test_bundle_round_trip(plugin_bundle, cache_320_dir, tmp_path):
    from d2build import backends, photos
    from d2build.compare import match_detections
    from d2build.deploy import load_bundle
    from d2build.runtime import Model

    model, bundle = load_bundle(plugin_bundle)
    doc = bundle.doc
    assert bundle.backend == "reference" and bundle.flavour == "plugins" and not bundle.has_engine
    assert plugin_bundle.name == doc["name"] and doc["name"].endswith(doc["key"][:12])
    assert plugin_bundle.name.startswith("mask_rcnn_r50-320x320-fp32-plugins-")
    assert doc["format_version"] == 1 and doc["input"]["shape"] == [1, 3, 320, 320]
    assert doc["input"]["channels"] == "BGR" and doc["input"]["resize"]["rule"] == "letterbox"
    assert [o["name"] for o in doc["outputs"]] == ["num_detections", "detection_boxes", "detection_scores",
                                                  "detection_classes", "detection_masks"]
    assert doc["outputs"][4]["shape"] == [1, 100, 28, 28] and all(o["meaning"] for o in doc["outputs"])
    assert len(doc["model"]["class_names"]) == 80 and doc["model"]["class_names"][0] == "person"
    assert doc["postprocess"]["score_threshold"] == 0.05 and doc["postprocess"]["max_detections"] == 100
    assert {"weights", "export", "surgery", "precision", "verify"} <= set(doc["cache_keys"])
    assert doc["verify"]["matched_share"] >= 0.99 and doc["recipe"]["config"]["verify"]["count"] == 1
    assert "surgery.ops=plugins" in doc["recipe"]["overrides"]
    assert not [o for o in doc["recipe"]["overrides"] if o.startswith("cache.")]  # machine-local: not recorded
    assert doc["check"]["status"] == "skipped" and "TensorRT is not installed" in doc["check"]["reason"]
    manifest = json.loads((plugin_bundle / "manifest.json").read_text())
    on_disk = {str(p.relative_to(plugin_bundle)) for p in plugin_bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    assert {"model.onnx", "model.json", "verify/report.md", "verify/metrics.json", "triton/README.md",
            "detect.py", "runtime/d2build/deploy/bundle.py", "runtime/d2build/deploy/onnx_runner.py"} <= on_disk
    from d2build.deploy.vendor import runtime_files

    assert {f"runtime/d2build/{rel}" for rel in runtime_files()} <= on_disk  # the whole runtime, digest-checked
    assert doc["graph"]["float16"] is False and doc["runtime"] == {"launcher": "detect.py", "folder": "runtime"}
    # the bundle runs what the cache holds: same detections as the cached precision graph
    graph = Path(cache_320_dir) / "precision" / doc["cache_keys"]["precision"] / "model.onnx"
    direct = Model(backends.open_graph(graph), model.info)
    photo = photos.bundled("coffee")
    a, _, _ = direct.detect(photo.bgr)
    b, _, _ = model.detect(photo.bgr)
    assert len(a) == len(b) >= 50
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert match_detections(a, b, iou_min=0.999, score_tol=1e-6).recovered == 1.0


def test_redeploy_same_content_is_a_no_op(plugin_bundle, cache_320_dir, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in plugin_bundle.rglob("*") if p.is_file()}
    out = plugin_bundle.parent
    proc = deploy_command(["--out", str(out), "--run-dir", str(tmp_path / "run"), *SMALL, "surgery.ops=plugins"],
                          cache_320_dir)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "unchanged" in proc.stdout + proc.stderr
    assert {p: p.stat().st_mtime_ns for p in plugin_bundle.rglob("*") if p.is_file()} == before
    assert sorted(out.iterdir()) == [plugin_bundle]  # no second folder, no leftovers


def test_write_bundle_finds_rewrites_and_never_leaves_half_a_bundle(plugin_bundle, tmp_path):
    from d2build.deploy.bundle import BundleSource, write_bundle
    from d2build.runtime import ModelInfo

    doc = json.loads((plugin_bundle / "model.json").read_text())
    src = BundleSource(name="test", graph=plugin_bundle / "model.onnx", info=ModelInfo.from_dict(doc["model"]),
                       recipe=doc["recipe"], keys=doc["cache_keys"], postprocess=doc["postprocess"],
                       reports={"verify/report.md": plugin_bundle / "verify" / "report.md"}, verify=doc["verify"],
                       check=doc["check"], triton_prefix="t")
    path, status = write_bundle(tmp_path, src)
    assert status == "written" and path.name.startswith("test-") and (path / "triton" / "t" / "config.pbtxt").is_file()
    assert write_bundle(tmp_path, src) == (path, "unchanged")
    (path / "verify" / "report.md").write_text("edited")
    said = []
    assert write_bundle(tmp_path, src, say=said.append) == (path, "replaced")
    assert "does not match its sha256" in said[0]
    assert (path / "verify" / "report.md").read_bytes() == (plugin_bundle / "verify" / "report.md").read_bytes()
    src.postprocess = {**src.postprocess, "display_score_threshold": 0.3}  # other content: another bundle
    other, status = write_bundle(tmp_path, src)
    assert status == "written" and other != path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name])  # no temp leftovers


def test_tampered_or_missing_files_are_refused_naming_the_file(plugin_bundle, tmp_path):
    from d2build.deploy import BundleError, load_bundle

    b = copy_bundle(plugin_bundle, tmp_path / "b")
    with open(b / "model.onnx", "r+b") as f:  # one byte in the middle of the weights
        f.seek((b / "model.onnx").stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match=r"model\.onnx: does not match its sha256 in manifest\.json"):
        load_bundle(b)
    c = copy_bundle(plugin_bundle, tmp_path / "c")
    vendored = next(c.glob("triton/*_postprocess/1/d2build/processing.py"))
    vendored.write_text(vendored.read_text() + "\n# edited\n")
    with pytest.raises(BundleError, match="processing.py: does not match its sha256"):
        load_bundle(c)
    (c / "model.json").unlink()
    with pytest.raises(BundleError, match=r"model\.json: listed in manifest\.json but missing"):
        load_bundle(c)
    with pytest.raises(BundleError, match="manifest.json: missing"):
        load_bundle(tmp_path)


def test_newer_format_is_refused(plugin_bundle, tmp_path):
    from d2build.deploy import BundleError, load_bundle

    b = copy_bundle(plugin_bundle, tmp_path / "b")
    edit_model_json(b, lambda d: d.update(format_version=2))
    with pytest.raises(BundleError, match=r"model\.json: bundle format version 2 is newer than this d2build reads "
                                          r"\(1\); upgrade d2build"):
        load_bundle(b)


def test_batch_larger_than_the_model_takes(plugin_bundle, tmp_path):
    from d2build.deploy import BundleError, load_bundle

    model, _ = load_bundle(plugin_bundle)
    with pytest.raises(BundleError, match=r"model\.onnx: a batch of 2 images, but this model takes at most 1"):
        model.runner.run({"input_tensor": np.zeros((2, 3, 320, 320), np.float32)})
    with pytest.raises(BundleError, match=r"takes shape \[1, 3, 320, 320\], got \[1, 3, 640, 640\]"):
        model.runner.run({"input_tensor": np.zeros((1, 3, 640, 640), np.float32)})
    b = copy_bundle(plugin_bundle, tmp_path / "b")
    edit_model_json(b, lambda d: d["model"].update(batch=4))
    with pytest.raises(BundleError, match=r"model\.json: says batch 4, but model\.onnx takes 1 image"):
        load_bundle(b)


def test_undecodable_images_are_refused_naming_them(plugin_bundle, tmp_path):
    from d2build.deploy import ImageError, decode_image, load_image

    png = photo_png(tmp_path).read_bytes()
    assert decode_image(png).shape == (512, 512, 3)
    for data, what in ((b"", "empty"), (b"GIF89a not really", "cannot be decoded"),
                       (png[: len(png) // 2], "cannot be decoded")):
        with pytest.raises(ImageError, match=what):
            decode_image(data, "upload.png")
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ImageError, match="broken.jpg: cannot be decoded"):
        load_image(bad)
    proc = subprocess.run([sys.executable, "-m", "d2build.deploy", str(plugin_bundle), str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "broken.jpg: cannot be decoded" in proc.stderr and not proc.stdout


def test_mask_rle_is_pycocotools_string(tmp_path):
    from pycocotools import mask as mask_util

    from d2build.deploy.runtime import encode_mask

    rng = np.random.default_rng(0)
    cases = [np.zeros((7, 5), bool), np.ones((7, 5), bool), rng.random((40, 33)) > 0.5,
             rng.random((300, 200)) > 0.97]
    blob = np.zeros((480, 640), bool)
    blob[100:380, 37:600] = True  # long runs: counts far above 2^5 and differences of both signs
    blob[200:210, 50:60] = False
    cases += [blob, blob.T.copy()]
    first = np.zeros((4, 4), bool)
    first[0, 0] = True
    cases.append(first)
    for m in cases:
        ref = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        assert encode_mask(m) == {"size": [int(v) for v in ref["size"]], "counts": ref["counts"].decode()}


# ------------------------------------------------------------------ deploy's refusals


def test_deploy_refuses_a_failed_engine_check_and_names_the_report(monkeypatch, tmp_path):
    from d2build.commands import deploy as cmd
    from d2build.compose import compose
    from d2build.runner import StageResult

    recipe = compose([*SMALL, f"cache.dir={tmp_path / 'cache'}"])
    ok = {n: StageResult(n, n * 4, "hit", 0.0, str(tmp_path / n)) for n in
          ("weights", "export", "surgery", "precision", "verify", "build")}
    failed = StageResult("check", "k", "failed", 1.0, str(tmp_path / "run" / "check-failed"), ["report.md"],
                         reason="engine check FAILED on 1 of 3 images (astronaut)\n  astronaut: ...")
    monkeypatch.setattr(cmd, "_results", lambda *a: {**ok, "check": failed})
    with pytest.raises(cmd.DeployRefused, match=r"the engine failed its check \(engine check FAILED on 1 of 3 "
                                                r"images \(astronaut\)\); it is not bundled\. Report: .*"
                                                r"check-failed/report\.md"):
        cmd.deploy(recipe, tmp_path / "out", tmp_path / "run", [])
    assert not (tmp_path / "out").exists()
    skipped = StageResult("check", "k", "skipped", 0.0, reason="needs build")
    monkeypatch.setattr(cmd, "_results", lambda *a: {**ok, "check": skipped})
    with pytest.raises(cmd.DeployRefused, match="not bundled unchecked"):
        cmd.deploy(recipe, tmp_path / "out", tmp_path / "run", [])
    with pytest.raises(cmd.DeployRefused, match="add surgery.ops=standard"):
        cmd.deploy(recipe, tmp_path / "out", tmp_path / "run", [], backend="onnxruntime")
    python_on_plugins = compose([*SMALL, f"cache.dir={tmp_path / 'cache'}", "deploy.triton.model=python"])
    with pytest.raises(cmd.DeployRefused, match=r"deploy.triton.model=python runs the graph in ONNX Runtime, which "
                                                r"cannot run the TensorRT plugin nodes.*add surgery.ops=standard"):
        cmd.deploy(python_on_plugins, tmp_path / "out", tmp_path / "run", [])
    with pytest.raises(cmd.DeployRefused, match="--backend tensorrt needs an engine.*TensorRT is not installed"):
        cmd.deploy(recipe, tmp_path / "out", tmp_path / "run", [], backend="tensorrt")


# ------------------------------------------------------------------ Triton


def model_config_pb2():
    """tritonclient's generated `model_config_pb2` (Triton's ModelConfig schema), loaded by file path."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed: pip install --no-deps tritonclient (only its generated "
                    "model_config_pb2 is used; its [grpc] extra would downgrade protobuf)")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def parse_repository(bundle: Path):
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    configs = {}
    for p in sorted((bundle / "triton").glob("*/config.pbtxt")):
        configs[p.parent.name] = text_format.Parse(p.read_text(), pb2.ModelConfig())
        assert configs[p.parent.name].name == p.parent.name
    return pb2, configs


def _dims(t) -> list[int]:
    return list(t.dims)


def check_ensemble(pb2, configs, name: str, model: str) -> None:
    """Every tensor an ensemble step reads is the ensemble's input or an earlier step's output, and
    every step's keys are inputs/outputs of the model it names (as Triton checks at load)."""
    ens = configs[name]
    assert ens.platform == "ensemble" and ens.max_batch_size == 0
    assert [i.name for i in ens.input] == ["IMAGE"] and ens.input[0].data_type == pb2.TYPE_UINT8
    available = {"IMAGE"}
    steps = ens.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [f"{name}_preprocess", model, f"{name}_postprocess"]
    for s in steps:
        target = configs[s.model_name]
        assert set(s.input_map) == {i.name for i in target.input}, s.model_name
        assert set(s.output_map) <= {o.name for o in target.output}, s.model_name
        assert set(s.input_map.values()) <= available, s.model_name
        available |= set(s.output_map.values())
    assert {o.name for o in ens.output} <= available
    assert "DETECTIONS" in {o.name for o in ens.output}


def repository_for(bundle: Path, model: str, dest: Path) -> Path:
    """The bundle's Triton repository as deploy.triton.model=`model` writes it (in a scratch copy of
    the bundle's model.json and graph: the repository is a function of those)."""
    from d2build.deploy import triton

    dest.mkdir(parents=True)
    doc = json.loads((bundle / "model.json").read_text())
    doc["triton"]["model"] = triton.resolve_model(model, doc["graph"]["flavour"], False)
    (dest / "model.json").write_text(json.dumps(doc))
    os.link(bundle / "model.onnx", dest / "model.onnx")
    triton.write_repository(dest, doc)
    return dest


def check_python_model(pb2, configs, bundle: Path, name: str, role: str) -> None:
    py = configs[name]
    assert py.backend == "python" and py.parameters["role"].string_value == role
    assert (bundle / "triton" / name / "1" / "model.py").is_file()
    assert (bundle / "triton" / name / "1" / "model.json").read_bytes() == (bundle / "model.json").read_bytes()
    assert (bundle / "triton" / name / "1" / "d2build" / "deploy" / "onnx_runner.py").is_file()


def test_triton_repository_parses_with_tritons_model_config(plugin_bundle, standard_bundle, tmp_path):
    from d2build.deploy.triton import TritonChoiceError, resolve_model

    for bundle in (plugin_bundle, standard_bundle):
        doc = json.loads((bundle / "model.json").read_text())
        graph_out = {o["name"]: o["shape"] for o in doc["outputs"]}
        standard = doc["graph"]["flavour"] == "standard"
        # deploy.triton.model=auto without an engine: python for a standard-op graph, the engine for plugins
        assert doc["triton"]["model"] == ("python" if standard else "tensorrt")
        choices = ("tensorrt", "onnxruntime", "python") if standard else ("tensorrt",)
        for model in choices:
            root = bundle if model == doc["triton"]["model"] else repository_for(bundle, model, tmp_path / model)
            pb2, configs = parse_repository(root)
            infer = {"tensorrt": "mask_rcnn_r50_engine", "onnxruntime": "mask_rcnn_r50_onnxruntime",
                     "python": "mask_rcnn_r50_ort_python"}[model]
            assert set(configs) == {"mask_rcnn_r50", "mask_rcnn_r50_preprocess", infer, "mask_rcnn_r50_postprocess"}
            check_python_model(pb2, configs, root, "mask_rcnn_r50_preprocess", "preprocess")
            check_python_model(pb2, configs, root, "mask_rcnn_r50_postprocess", "postprocess")
            check_ensemble(pb2, configs, "mask_rcnn_r50", infer)
            graph = configs[infer]
            assert [(i.name, _dims(i), i.data_type) for i in graph.input] == [("input_tensor", [1, 3, 320, 320],
                                                                               pb2.TYPE_FP32)]
            assert {o.name: _dims(o) for o in graph.output} == graph_out
            assert {o.name: o.data_type for o in graph.output}["num_detections"] == pb2.TYPE_INT32
            readme = (root / "triton" / "README.md").read_text()
            assert f"deploy.triton.model={model}" in readme and "nvcr.io/nvidia/tritonserver" in readme
            if model == "tensorrt":
                assert graph.platform == "tensorrt_plan" and graph.max_batch_size == 0
                assert graph.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
                assert not (root / "triton" / infer / "1" / "model.plan").exists()  # no TensorRT here
                assert "model.plan missing" in readme
            elif model == "onnxruntime":
                assert graph.platform == "onnxruntime_onnx"
                assert (root / "triton" / infer / "1" / "model.onnx").stat().st_ino == (root / "model.onnx").stat().st_ino
            else:
                check_python_model(pb2, configs, root, infer, "onnxruntime")
                assert graph.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_AUTO  # GPU where there is one
                assert (root / "triton" / infer / "1" / "model.onnx").stat().st_ino == (root / "model.onnx").stat().st_ino
                assert "d2build serve" in readme and "pip install pillow onnxruntime" in readme
        if not standard:
            assert "libnvinfer_plugin" in (bundle / "triton" / "README.md").read_text()
            for model in ("onnxruntime", "python"):
                with pytest.raises(TritonChoiceError, match=f"deploy.triton.model={model} runs the graph in ONNX "
                                                            "Runtime.*add surgery.ops=standard"):
                    resolve_model(model, "plugins", False)


def test_serving_repository_adds_the_execution_environment_and_parses(standard_bundle, tmp_path):
    """What `d2build serve` hands the server: the bundle's configs, EXECUTION_ENV_PATH added to the
    Python models' (Triton's documented way to give them their Python), version folders linked to the
    bundle's; still Triton's ModelConfig."""
    from google.protobuf import text_format

    from d2build.deploy.tritonserver import PythonEnv, serving_repository

    env = PythonEnv(tmp_path / "env", "3.11", {})
    order = serving_repository(standard_bundle / "triton", tmp_path / "models", env)
    assert order == ["mask_rcnn_r50_ort_python", "mask_rcnn_r50_postprocess", "mask_rcnn_r50_preprocess",
                     "mask_rcnn_r50"]  # steps first, the ensemble last: the order they are loaded in
    pb2 = model_config_pb2()
    for name in order:
        config = text_format.Parse((tmp_path / "models" / name / "config.pbtxt").read_text(), pb2.ModelConfig())
        version = tmp_path / "models" / name / "1"
        assert version.is_symlink() and version.resolve() == (standard_bundle / "triton" / name / "1").resolve()
        if config.backend == "python":
            assert config.parameters["EXECUTION_ENV_PATH"].string_value == str(env.path)
        else:
            assert config.platform == "ensemble" and "EXECUTION_ENV_PATH" not in config.parameters
    assert "EXECUTION_ENV_PATH" not in (standard_bundle / "triton" / "mask_rcnn_r50_preprocess" / "config.pbtxt").read_text()


PB_UTILS_STANDIN = '''
"""A minimal STAND-IN of Triton's `triton_python_backend_utils`, for tests only: it is not Triton's
module (that one exists only inside tritonserver's Python backend). It provides just the names the
python_backend README documents and d2build's model.py uses -- `Tensor(name, array)` with `name()` and
`as_numpy()`, `get_input_tensor_by_name(request, name)` (None when absent), `InferenceRequest` (built
here from tensors; Triton builds it), `InferenceResponse(output_tensors=..., error=...)` with
`output_tensors()`, `has_error()`, `error()`, and `TritonError(message)` with `message()`."""
import numpy as np


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class TritonError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self._message, self._code = message, code

    def code(self):
        return self._code

    def message(self):
        return self._message


class InferenceRequest:
    def __init__(self, inputs):
        self._inputs = {t.name(): t for t in inputs}

    def inputs(self):
        return list(self._inputs.values())


class InferenceResponse:
    def __init__(self, output_tensors=None, error=None):
        self._outputs, self._error = list(output_tensors or []), error

    def output_tensors(self):
        return self._outputs

    def has_error(self):
        return self._error is not None

    def error(self):
        return self._error


def get_input_tensor_by_name(request, name):
    return request._inputs.get(name)
'''

DRIVER = '''
import importlib.util, json, sys
import numpy as np
repo, work = sys.argv[1], sys.argv[2]
import triton_python_backend_utils as pb


def load(role):
    path = f"{repo}/mask_rcnn_r50_{role}/1/model.py"
    spec = importlib.util.spec_from_file_location(f"model_{role}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"name": f"mask_rcnn_r50_{role}",
                                                  "parameters": {"role": {"string_value": role}}}),
                      "model_repository": f"{repo}/mask_rcnn_r50_{role}", "model_version": "1",
                      "model_name": f"mask_rcnn_r50_{role}", "model_instance_kind": "CPU",
                      "model_instance_device_id": "0"})
    return model


pre = load("preprocess")
import d2build
image = np.frombuffer(open(f"{work}/astronaut.png", "rb").read(), dtype=np.uint8)
good = pb.InferenceRequest([pb.Tensor("IMAGE", image)])
bad = pb.InferenceRequest([pb.Tensor("IMAGE", np.frombuffer(b"not an image at all", dtype=np.uint8))])
r_good, r_bad = pre.execute([good, bad])
out = {t.name(): t.as_numpy() for t in r_good.output_tensors()}
np.savez(f"{work}/pre.npz", **out)
graph = dict(np.load(f"{work}/graph_outputs.npz"))
post = load("postprocess")
req = pb.InferenceRequest([pb.Tensor("ORIGINAL_HW", out["ORIGINAL_HW"])] + [pb.Tensor(k, v) for k, v in graph.items()])
(resp,) = post.execute([req])
res = {t.name(): t.as_numpy() for t in resp.output_tensors()}
blocked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "detectron2", "hydra", "omegaconf"))
print(json.dumps({"d2build": d2build.__file__, "bad_error": r_bad.error().message() if r_bad.has_error() else None,
                  "bad_code": r_bad.error().code() if r_bad.has_error() else None,
                  "good_error": r_good.has_error(), "detections": json.loads(res["DETECTIONS"][0]),
                  "boxes_shape": list(res["BOXES"].shape), "classes": res["CLASSES"].tolist(), "blocked": blocked}))
'''


def test_python_backend_model_executes_with_the_runtime(plugin_bundle, tmp_path):
    from d2build.deploy import decode_image, load_bundle
    from d2build.deploy.runtime import detections_to_dict, postprocess

    model, bundle = load_bundle(plugin_bundle)
    png = photo_png(tmp_path)
    bgr = decode_image(png.read_bytes())
    x, (lb,) = model.prepare([bgr])
    outputs = model.runner.run({"input_tensor": x})
    np.savez(tmp_path / "graph_outputs.npz", **outputs)
    expected = detections_to_dict("IMAGE", postprocess(outputs, lb.original_hw, model.info), lb.original_hw,
                                  model.info)
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "triton_python_backend_utils.py").write_text(PB_UTILS_STANDIN)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = no_torch_env(tmp_path / "block", stub)
    env["PYTHONPATH"] = env["PYTHONPATH"].replace(os.pathsep + str(REPO), "")  # only the vendored d2build
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py"), str(plugin_bundle / "triton"), str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["blocked"] == []
    assert "/triton/mask_rcnn_r50_preprocess/1/d2build/" in got["d2build"]  # the vendored copy ran
    assert got["good_error"] is False and "IMAGE: cannot be decoded as an image" in got["bad_error"]
    assert got["bad_code"] == "INVALID_ARG" and "BytesIO" not in got["bad_error"]  # a client error, in plain words
    pre = np.load(tmp_path / "pre.npz")
    np.testing.assert_array_equal(pre["input_tensor"], x)
    assert pre["input_tensor"].dtype == np.float32 and pre["ORIGINAL_HW"].tolist() == [512, 512]
    assert got["detections"] == expected and len(expected["detections"]) >= 50
    assert got["boxes_shape"] == [len(expected["detections"]), 4]
    assert got["classes"] == [d["class_id"] for d in expected["detections"]]
