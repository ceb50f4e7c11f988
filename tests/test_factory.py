import os
import pickle

import open_clip
import pytest
import torch

import gem


def test_seeded_random_weights_are_reproducible():
    a, _ = gem.create_clip("gemlabel-tiny")
    b, _ = gem.create_clip("gemlabel-tiny")
    c, _ = gem.create_clip("gemlabel-tiny", seed=1)
    wa, wb, wc = (m.visual.conv1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_local_checkpoint_loads(tiny_checkpoint, tiny_clip):
    model = gem.create_gem_model("gemlabel-tiny", pretrained=tiny_checkpoint, seed=5)
    assert torch.equal(model.model.visual.proj, tiny_clip[0].visual.proj)


def test_config_file_as_model_name(tmp_path):
    src = os.path.join(os.path.dirname(gem.__file__), "model_configs", "gemlabel-tiny.json")
    dst = tmp_path / "my-tiny.json"
    dst.write_text(open(src).read())
    model = gem.create_gem_model(str(dst), depth=2)
    assert "my-tiny" in open_clip.list_models()
    assert model.depth == 2


def test_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(gem.WeightsUnavailableError, match="does not exist"):
        gem.create_gem_model("gemlabel-tiny", pretrained=str(tmp_path / "nope.pt"))


def test_unknown_tag_lists_known_ones():
    with pytest.raises(gem.WeightsUnavailableError, match="known tags"):
        gem.create_gem_model("ViT-B-32", pretrained="not-a-tag")


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model"):
        gem.create_gem_model("ViT-Nope-99")


def test_offline_weights_fail_fast_with_advice(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(gem.WeightsUnavailableError, match="HF_HUB_OFFLINE"):
        gem.create_gem_model("ViT-B-32", pretrained="laion2b_s34b_b79k")


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoint_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f)
    with pytest.raises(gem.WeightsUnavailableError, match="never runs pickled code"):
        gem.create_gem_model("gemlabel-tiny", pretrained=str(path))
    assert not marker.exists()


def test_non_vit_models_are_refused():
    model = open_clip.create_model("RN50", pretrained=None)
    with pytest.raises(TypeError, match="ViT"):
        gem.GEM(model)
