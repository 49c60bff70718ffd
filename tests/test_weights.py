"""Weights: model-zoo pickles through the restricted unpickler, offline URLs, random weights that behave."""

from __future__ import annotations

import io
import os
import pickle
import time

import numpy as np
import pytest
import torch

from d2build import detectron, photos

CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


@pytest.fixture(scope="module")
def cfg():
    return detectron.load_cfg(CONFIG)


@pytest.fixture(scope="module")
def random_model(cfg):
    chw = np.ascontiguousarray(photos.bundled("astronaut").bgr.transpose(2, 0, 1), dtype=np.float32)
    return detectron.random_model(cfg, 0, chw)


def test_random_weights_are_seeded_and_detect_things(cfg, random_model):
    chw = np.ascontiguousarray(photos.bundled("astronaut").bgr.transpose(2, 0, 1), dtype=np.float32)
    again = detectron.random_model(cfg, 0, chw)
    a, b = random_model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = detectron.random_model(cfg, 1, chw)
    assert not torch.equal(a["backbone.bottom_up.stem.conv1.weight"],
                            other.state_dict()["backbone.bottom_up.stem.conv1.weight"])
    with torch.no_grad():
        inst = random_model.inference([{"image": torch.as_tensor(chw)}], do_postprocess=False)[0]
    assert len(inst) >= 50  # identity BN gives 2 boxes scored 1.0; these behave
    assert 0.05 <= float(inst.scores.max()) < 0.99
    assert len(set(inst.pred_classes.tolist())) >= 10


def _zoo_checkpoint(model) -> bytes:
    """A model-zoo style pickle: {"model": {name: numpy array}, "__author__": ...}."""
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    return pickle.dumps({"model": state, "__author__": "d2build tests"}, protocol=2)


def test_model_zoo_pickle_loads_exactly(cfg, random_model, tmp_path):
    path = tmp_path / "model_final.pkl"
    path.write_bytes(_zoo_checkpoint(random_model))
    fresh = detectron.build_model(cfg)
    detectron.load_checkpoint(fresh, str(path))
    want, got = random_model.state_dict(), fresh.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/d2build-pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    data = pickle.dumps({"model": {"w": np.zeros(3)}, "x": _Evil()})
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system|only numpy"):
        detectron.read_pkl_checkpoint(data)
    assert not os.path.exists("/tmp/d2build-pwned")


def test_unreachable_url_fails_fast_with_what_to_do():
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        detectron.fetch_weights("http://127.0.0.1:9/model_final.pkl", timeout=5)
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert "model.weights=random" in msg and "model.weights=/path/to/model.pkl" in msg


def test_torch_checkpoint_loads_with_weights_only(cfg, random_model, tmp_path):
    path = tmp_path / "model.pth"
    buf = io.BytesIO()
    torch.save({"model": random_model.state_dict()}, buf)
    path.write_bytes(buf.getvalue())
    fresh = detectron.build_model(cfg)
    detectron.load_checkpoint(fresh, str(path))
    assert torch.equal(fresh.state_dict()["roi_heads.box_predictor.cls_score.weight"],
                       random_model.state_dict()["roi_heads.box_predictor.cls_score.weight"])
