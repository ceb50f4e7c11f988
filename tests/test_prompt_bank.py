"""The prompt bank: file round trip, cache, model checks, synonyms, top-k over a big bank,
and `gemlabel run` with a built-in vocabulary through the cache."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gem
from jobs.cli import main
from pipeline.prompts import bank as prompt_bank
from pipeline.stages.label import Labeler, top_k_softmax
from pipeline.stages.options import LabelOptions
from pipeline.weights import default_pretrained, gem_pretrained
from tests.shards import write_good_shards

MODEL = "gemlabel-tiny"
NAMES = ["cat", "sofa; couch", "red car"]


@pytest.fixture(scope="module")
def bank():
    return prompt_bank.build(NAMES, MODEL, templates="imagenet", progress=False)


def test_round_trip(bank, tmp_path):
    path = str(tmp_path / "sub" / "bank.parquet")
    prompt_bank.save(bank, path)
    loaded = prompt_bank.load(path)
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    assert loaded == prompt_bank.PromptBank(**{**bank.__dict__, "embeddings": loaded.embeddings})
    assert loaded.key == bank.key and len(loaded.templates) == 80
    assert os.listdir(tmp_path / "sub") == ["bank.parquet"]  # no temp files left
    np.testing.assert_allclose(np.linalg.norm(loaded.embeddings, axis=1), 1, atol=1e-6)


def test_synonyms_are_averaged(tiny_clip):
    clip, tokenizer = tiny_clip
    templates = prompt_bank.resolve_templates("single")
    got = prompt_bank.encode(clip, tokenizer, ["sofa; couch", "cat"], templates, progress=False)
    single = gem.encode_class_names(clip, tokenizer, ["sofa", "couch", "cat"])
    want = F.normalize(single[:2].mean(0), dim=-1)
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-6)
    np.testing.assert_allclose(got[1], single[2].numpy(), atol=1e-6)


def test_length_sorted_windows_keep_class_order(tiny_clip, monkeypatch):
    """Prompts of very different lengths, encoded in length-sorted windows and batches,
    come back in class order (the same embeddings as one plain pass)."""
    clip, tokenizer = tiny_clip
    names = ["cat", "a very long and rather wordy class name", "dog", "sea lion", "x" * 3]
    templates = ("a photo of a {}.", "{}", "a blurry, dark and badly framed picture of the {}")
    monkeypatch.setattr(prompt_bank, "SORT_WINDOW", 4)
    got = prompt_bank.encode(clip, tokenizer, names, templates, batch_size=3, progress=False)
    want = gem.encode_class_names(clip, tokenizer, names, templates)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)


def test_template_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a photo of a {}.\n\n# mine\na drawing of the {}\n")
    assert prompt_bank.resolve_templates(str(path)) == ("a photo of a {}.", "a drawing of the {}")
    path.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="one '{}'"):
        prompt_bank.resolve_templates(str(path))
    with pytest.raises(ValueError, match="not one of"):
        prompt_bank.resolve_templates("nope")


def test_cache_hit_and_miss_by_key(tmp_path, monkeypatch):
    built = []
    real_build = prompt_bank.build
    monkeypatch.setattr(prompt_bank, "build", lambda *a, **k: built.append(a) or real_build(*a))
    cache = str(tmp_path)
    first, path = prompt_bank.cached(["cat", "dog"], MODEL, cache_dir=cache)
    again, same = prompt_bank.cached(["cat", "dog"], MODEL, cache_dir=cache)
    assert len(built) == 1 and same == path
    np.testing.assert_array_equal(first.embeddings, again.embeddings)
    for names, seed, templates in [
        (["dog", "cat"], 0, "single"),  # another vocabulary
        (["cat", "dog"], 1, "single"),  # other random weights
        (["cat", "dog"], 0, "imagenet"),  # other templates
    ]:
        _, other = prompt_bank.cached(names, MODEL, None, templates, seed, cache)
        assert other != path
    assert len(built) == 4 and len(os.listdir(tmp_path)) == 4


def test_bank_for_another_model_is_refused(bank, tmp_path, tiny_checkpoint):
    path = str(tmp_path / "bank.parquet")
    prompt_bank.save(bank, path)
    prompt_bank.check_model(bank, MODEL, None, 0, path)
    for model, pretrained, seed in [("ViT-B-16", None, 0), (MODEL, None, 1), (MODEL, "x.pt", 0)]:
        with pytest.raises(prompt_bank.BankMismatchError, match="was built for model gemlabel"):
            prompt_bank.check_model(bank, model, pretrained, seed, path)
    with pytest.raises(prompt_bank.BankMismatchError):  # the actors check the file too
        Labeler(LabelOptions(MODEL, tiny_checkpoint, "gem", 2, 0.0, (32, 32)), path)


def test_top_k_matches_brute_force_on_20000_classes():
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(20_000, 64, generator=gen), dim=-1)
    image = F.normalize(torch.randn(6, 64, generator=gen), dim=-1)
    want_scores, want_ids = (100 * image @ bank.T).softmax(-1).topk(7, dim=-1)
    for chunk in (20_000, 3_000, 256):
        scores, ids = top_k_softmax(image, bank, 100.0, 7, chunk=chunk)
        assert torch.equal(ids, want_ids), chunk
        torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-7)


def test_labeler_on_a_20000_class_bank_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(20_000, 32, generator=gen), dim=-1).numpy()
    labeler = Labeler(LabelOptions(MODEL, None, "gem", 5, 0.0, (32, 32)), bank)
    pixels = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = labeler.label(pixels)
    with torch.inference_mode():
        features = labeler.model.encode_image(labeler._model_input(*labeler._host_batch(pixels)))
        image = F.normalize(features.image_embeds, dim=-1)
        probs = (labeler.logit_scale * image @ torch.from_numpy(bank).T).softmax(-1)
    scores, ids = probs.topk(5, dim=-1)
    for (labels, got, logits, background), want, want_ids in zip(out, scores, ids, strict=True):
        np.testing.assert_array_equal(labels, want_ids.numpy())
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
        assert logits.shape == (5, 4, 4) and background is None


@pytest.mark.slow
def test_run_with_a_builtin_vocabulary_reuses_the_cache(ray_local, tmp_path, capsys):
    shards = write_good_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    cache = tmp_path / "cache"
    tiny = ["--model", "gemlabel-tiny", "--pretrained", "random"]
    args = [*shards, *tiny, "--vocab", "voc", "--image-size", "64", "--bank-cache", str(cache)]
    args += ["--top-k", "2", "--batch-size", "4"]
    assert main(["run", *args, "--out", str(tmp_path / "a")]) == 0
    (bank_file,) = os.listdir(cache)
    built = os.stat(cache / bank_file).st_mtime_ns
    assert main(["run", *args, "--out", str(tmp_path / "b")]) == 0
    assert os.listdir(cache) == [bank_file] and os.stat(cache / bank_file).st_mtime_ns == built
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["config"]["vocabulary"]["classes"] == 20
    assert manifest["prompt_bank_file"] == str(cache / bank_file)
    # the same bank passed as a file; a bank for other weights is refused (exit 2)
    bank_args = [*shards, *tiny, "--bank", str(cache / bank_file), "--image-size", "64"]
    assert main(["run", *bank_args, "--top-k", "2", "--out", str(tmp_path / "c")]) == 0
    assert main(["run", *bank_args, "--seed", "3", "--out", str(tmp_path / "d")]) == 2
    assert "was built for model gemlabel-tiny" in capsys.readouterr().err


def test_spliced_tokens_equal_the_tokenizer(tiny_clip):
    names = ["dog", "U.S.", "dog's", "x-ray", "3d", "café", "a&b", "hot dog", "Ångström"]
    names.append("a name long enough to be cut at the tiny model's sixteen token context")
    pairs = [(t, n) for n in names for t in prompt_bank.resolve_templates("imagenet")]
    want = tiny_clip[1]([t.format(n) for t, n in pairs])
    assert torch.equal(prompt_bank.tokenize(tiny_clip[1], pairs), want)


def test_text_encoding_cut_after_the_longest_prompt_is_exact(tiny_clip):
    clip, tokenizer = tiny_clip
    tokens = tokenizer(["a cat", "a photo of a big red car on a road"])
    with torch.no_grad():
        torch.testing.assert_close(prompt_bank.encode_text(clip, tokens), clip.encode_text(tokens))


def test_a_replaced_checkpoint_changes_the_cache_key(tmp_path):
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"12345")
    key = prompt_bank.bank_key(MODEL, str(ckpt), 0, ("a {}.",), "h")
    ckpt.write_bytes(b"123456")
    assert prompt_bank.bank_key(MODEL, str(ckpt), 0, ("a {}.",), "h") != key


def test_bundled_weights_key_the_cache_by_the_checkpoint(tmp_path, monkeypatch):
    """pretrained=None on a model with bundled weights keys by that file, not the seed."""
    ckpt = tmp_path / "toy.pt"
    ckpt.write_bytes(b"v1")
    monkeypatch.setitem(gem.factory.BUNDLED_WEIGHTS, MODEL, ckpt)
    key = prompt_bank.bank_key(MODEL, None, 0, ("a {}.",), "h")
    assert prompt_bank.bank_key(MODEL, None, 1, ("a {}.",), "h") == key  # seed is unused
    ckpt.write_bytes(b"v2, retrained")
    assert prompt_bank.bank_key(MODEL, None, 0, ("a {}.",), "h") != key


def test_prompts_build_and_list_commands(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("cat\nsofa; couch\n")
    out = str(tmp_path / "bank.parquet")
    base = ["prompts", "build", "--model", "gemlabel-tiny", "--device", "cpu", "--out", out]
    assert main([*base, "--vocab", str(vocab)]) == 2  # random weights only when asked for
    assert "--model gemlabel-tiny has no default weights" in capsys.readouterr().err
    base += ["--pretrained", "random"]
    assert main([*base, "--vocab", str(vocab), "--templates", "imagenet"]) == 0
    assert "2 classes x 80 templates" in capsys.readouterr().out
    bank = prompt_bank.load(out)
    assert bank.names == ["cat", "sofa; couch"] and bank.embeddings.shape == (2, 32)
    assert main([*base, "--vocab", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err
    assert main([*base, "--vocab", str(vocab), "--pretrained", str(tmp_path / "no.pt")]) == 2
    assert "no.pt" in capsys.readouterr().err
    assert main(["prompts", "list"]) == 0
    assert "imagenet21k" in capsys.readouterr().out


def test_weights_are_asked_for():
    """Random weights only with --pretrained random; a bundled model's own weights need no
    flag and take no "random"; ViT-B-16's default are the paper's."""
    prompt_bank.check_weights("gemlabel-tiny", "random")
    prompt_bank.check_weights("gemlabel-toy", None)
    prompt_bank.check_weights("hf-hub:org/model", None)
    with pytest.raises(ValueError, match="--pretrained random: --model gemlabel-toy ships"):
        prompt_bank.check_weights("gemlabel-toy", "random")
    with pytest.raises(ValueError, match="--model ViT-L-14 has no default weights"):
        prompt_bank.check_weights("ViT-L-14", default_pretrained("ViT-L-14", None))
    assert default_pretrained("ViT-B-16", None) == "laion2b_s34b_b88k"
    assert default_pretrained("ViT-B-16", "openai") == "openai"
    assert (gem_pretrained("random"), gem_pretrained("x.pt")) == (None, "x.pt")
