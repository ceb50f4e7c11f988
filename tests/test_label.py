"""The labeling stage, exercised directly (the Ray runs are in test_run.py)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gem
import pipeline.stages.label
from pipeline.prompts.bank import build
from pipeline.prompts.vocab import load_vocabulary, vocabulary_hash
from pipeline.stages.decode import decode_batch, decode_jpegs
from pipeline.stages.label import Labeler, refine_maps, resolve_precision
from pipeline.stages.masks import encode_masks, masks_from_runs
from pipeline.stages.options import LabelOptions
from tests.shards import corrupt_huffman_jpeg, image_bytes

NAMES = ["cat", "dog", "car", "tree", "sky", "road", "person", "boat"]


@pytest.fixture(scope="module")
def bank():
    return build(NAMES, "gemlabel-tiny").embeddings


def make_batch(n: int, size=(48, 64), errors=(), seed=0):
    rng = np.random.default_rng(seed)
    return {
        "shard": np.array(["s.tar"] * n, dtype=object),
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "width": np.full(n, 100),
        "height": np.full(n, 80),
        "error": np.array([("decode: bad" if i in errors else None) for i in range(n)], object),
        "pixels": rng.integers(0, 256, (n, *size, 3), dtype=np.uint8),
    }


def labeler(bank, templates=gem.SINGLE_TEMPLATE, **options):
    args = dict(
        model="gemlabel-tiny",
        pretrained=None,
        method="gem",
        top_k=3,
        score_threshold=0.0,
        image_size=(48, 64),
        precision="fp32",
    )
    return Labeler(LabelOptions(**{**args, **options}), bank, templates)


def test_top_k_and_logits_match_a_direct_computation(bank):
    batch = make_batch(3)
    stage = labeler(bank)
    out = stage(batch)
    model = gem.create_gem_model("gemlabel-tiny", device=stage.device)  # same device, same math
    x = gem.normalize_uint8(torch.from_numpy(batch["pixels"]).to(stage.device))
    text = torch.from_numpy(bank).to(stage.device)
    with torch.no_grad():
        features = model.encode_image(x)
        sims = F.normalize(features.image_embeds, dim=-1) @ text.T
        probs = (model.model.logit_scale.exp() * sims).softmax(-1).cpu()
        full = gem.patch_logits(features.patch_embeds, text).cpu()
    for i in range(3):
        want = probs[i].argsort(descending=True)[:3].numpy()
        np.testing.assert_array_equal(out["labels"][i], want)
        np.testing.assert_allclose(out["scores"][i], probs[i, want].numpy(), atol=1e-6)
        assert out["logits"][i].shape == (3, 6, 8)
        np.testing.assert_allclose(out["logits"][i], full[i, want].numpy(), atol=1e-5)


def test_background_map_is_the_max_over_background_prompts(bank):
    batch = make_batch(3, errors={2})
    prompts = ("background", "sky")
    stage = labeler(bank, background=prompts, templates=("a photo of a {}.", "a {}"))
    out = stage(batch)
    assert "background" not in labeler(bank)(batch)
    model = gem.create_gem_model("gemlabel-tiny", device=stage.device)  # same device, same math
    text = model.encode_text(list(prompts), ("a photo of a {}.", "a {}")).to(stage.device)
    x = gem.normalize_uint8(torch.from_numpy(batch["pixels"]).to(stage.device))
    with torch.no_grad():
        features = model.encode_image(x)
        want = gem.patch_logits(features.patch_embeds, text).amax(1).cpu()
    for i in range(2):
        np.testing.assert_allclose(out["background"][i], want[i].numpy(), atol=1e-5)
    assert out["background"][2].shape == (6, 8)  # the error row: a placeholder of zeros


def test_score_threshold_and_error_rows_pass_through(bank):
    batch = make_batch(4, errors={1})
    out = labeler(bank, score_threshold=0.13)(batch)
    assert out["error"][1] == "decode: bad"
    assert len(out["labels"][1]) == 0 and out["logits"][1].shape == (0, 6, 8)
    for i in (0, 2, 3):
        assert out["error"][i] is None
        assert (out["scores"][i] >= 0.13).all()
    assert "pixels" not in out
    assert list(out["key"]) == ["k0", "k1", "k2", "k3"]


def test_a_failing_sample_becomes_an_error_row(bank):
    batch = make_batch(3)
    pixels = list(batch["pixels"])
    pixels[2] = np.zeros((48, 64, 4), np.uint8)  # a 4-channel image: the batch fails, then it alone
    batch["pixels"] = np.array(pixels + [None], dtype=object)[:3]
    out = labeler(bank)(batch)
    assert out["error"][0] is None and out["error"][1] is None
    assert out["error"][2].startswith("label: ")


def test_all_null_error_column_as_nan(bank):
    """Ray turns an all-None error column into NaN floats; those rows are not errors."""
    batch = make_batch(2)
    batch["error"] = np.full(2, np.nan, dtype=np.float32)
    out = labeler(bank)(batch)
    assert list(out["error"]) == [None, None]
    assert all(len(labels) == 3 for labels in out["labels"])


def test_resolve_precision():
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))


def test_bf16_casts_the_weights_and_stays_close_to_fp32(bank):
    batch = make_batch(2)
    full, half = labeler(bank), labeler(bank, precision="bf16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    with torch.inference_mode():
        a, b = (
            m.model.encode_image(m._model_input(*m._host_batch(batch["pixels"])))
            for m in (full, half)
        )
    cos = F.cosine_similarity(a.patch_embeds, b.patch_embeds.float(), dim=-1)
    assert cos.min() > 0.99
    out = half(batch)
    assert all(len(labels) == 3 for labels in out["labels"])
    assert all(logits.dtype == np.float32 for logits in out["logits"])


def test_vocabulary_file(tmp_path, caplog):
    path = tmp_path / "vocab.txt"
    path.write_text("cat\n\n  dog \n# comment\ncat\nred car\n")
    assert load_vocabulary(str(path)) == ["cat", "dog", "red car"]
    assert "1 duplicate" in caplog.text
    assert vocabulary_hash(["cat", "dog"]) != vocabulary_hash(["dog", "cat"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no class names"):
        load_vocabulary(str(tmp_path / "empty.txt"))


def test_bank_is_normalized_text_embeddings(bank, tiny_clip):
    assert bank.shape == (len(NAMES), 32) and bank.dtype == np.float32
    want = gem.encode_class_names(*tiny_clip, NAMES).numpy()
    np.testing.assert_allclose(bank, want, atol=1e-6)


def test_compiled_forward_gives_the_same_labels(bank):
    batch = make_batch(2)
    eager, compiled = labeler(bank)(batch), labeler(bank, compile=True)(batch)
    for i in range(2):
        np.testing.assert_array_equal(eager["labels"][i], compiled["labels"][i])
        np.testing.assert_allclose(eager["logits"][i], compiled["logits"][i], atol=1e-5)


@pytest.mark.parametrize("mode", ["threshold", "background"])
def test_masks_on_the_actor_match_masks_from_logits(bank, mode):
    batch = make_batch(3, errors=(1,))
    background = ("background",) if mode == "background" else ()
    plain = labeler(bank, background=background)(batch)
    runs = labeler(bank, background=background, make_masks=True, mask_mode=mode)(batch)
    assert "logits" not in runs and runs["error"][1] == "decode: bad"
    assert len(runs["runs"][1]) == len(runs["run_lengths"][1]) == 0
    for i in (0, 2):
        args = (plain["labels"][i], plain["scores"][i], 80, 100)
        want = encode_masks(
            plain["logits"][i], *args, 0.5, mode, plain.get("background", [None] * 3)[i]
        )
        assert masks_from_runs(runs["runs"][i], runs["run_lengths"][i], *args) == want


@pytest.mark.parametrize("mode", ["threshold", "background"])
def test_pamr_refines_the_top_k_maps_as_gem_pamr_does(bank, mode):
    """refine="pamr": the same labels and scores; the logits are gem.pamr of the unrefined
    top-k maps (upsampled bilinearly to the model input) against the normalised input, at
    the model input size; the background map is refined with them; masks made on the actor
    from the refined maps equal those of the write stage."""
    batch = make_batch(3, errors=(1,))
    background = ("background",) if mode == "background" else ()
    plain = labeler(bank, background=background)(batch)
    refined = labeler(bank, background=background, refine="pamr")(batch)
    assert refined["error"][1] == "decode: bad" and refined["logits"][1].shape == (0, 48, 64)
    x = gem.normalize_uint8(torch.from_numpy(batch["pixels"][[0, 2]]))  # fp32, model input
    for j, i in enumerate((0, 2)):
        np.testing.assert_array_equal(refined["labels"][i], plain["labels"][i])
        np.testing.assert_array_equal(refined["scores"][i], plain["scores"][i])
        maps = torch.from_numpy(plain["logits"][i])
        if mode == "background":
            maps = torch.cat([maps, torch.from_numpy(plain["background"][i])[None]])
        up = F.interpolate(maps[None], size=(48, 64), mode="bilinear", align_corners=False)
        want = gem.pamr(x[j : j + 1], up, iterations=10, dilations=(8, 16))[0]
        assert refined["logits"][i].shape == (3, 48, 64)
        assert np.abs(refined["logits"][i] - up[0, :3].numpy()).max() > 1e-3  # it did change
        np.testing.assert_allclose(refined["logits"][i], want[:3].numpy(), atol=1e-5)
        if mode == "background":
            np.testing.assert_allclose(refined["background"][i], want[3].numpy(), atol=1e-5)
    runs = labeler(bank, background=background, refine="pamr", make_masks=True, mask_mode=mode)(
        batch
    )
    for i in (0, 2):
        args = (refined["labels"][i], refined["scores"][i], 80, 100)
        want = encode_masks(
            refined["logits"][i], *args, 0.5, mode, refined.get("background", [None] * 3)[i]
        )
        assert masks_from_runs(runs["runs"][i], runs["run_lengths"][i], *args) == want


def test_pamr_in_groups_and_only_the_kept_maps(bank):
    """Refining a few images at a time gives the same maps; with a score threshold only the
    kept classes' maps are refined, as they would be with all k."""
    torch.manual_seed(0)
    images, logits = torch.randn(3, 3, 20, 24), torch.randn(3, 2, 5, 6)
    background = torch.randn(3, 5, 6)
    whole = refine_maps(images, logits, background)
    one_by_one = refine_maps(images, logits, background, budget=1)
    for a, b in zip(whole, one_by_one, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert whole[0].shape == (3, 2, 20, 24) and whole[1].shape == (3, 20, 24)
    assert refine_maps(images, logits[:, :0])[0].shape == (3, 0, 20, 24)
    batch = make_batch(2, seed=1)
    plain = labeler(bank, refine="pamr")(batch)
    cut = float(np.mean([plain["scores"][i][1] for i in range(2)]))  # keeps 1 or 2 per image
    kept = labeler(bank, refine="pamr", score_threshold=cut)(batch)
    for i in range(2):
        n = len(kept["labels"][i])
        assert 0 < n < 3
        np.testing.assert_allclose(kept["logits"][i], plain["logits"][i][:n], atol=1e-6)


def test_resize_on_the_actor_matches_pil_resized_input(bank):
    """resize_on_device: original-size (ragged) pixels resized here label as PIL-resized ones."""
    rng = np.random.default_rng(1)
    originals = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((80, 100), (30, 20))]
    pil = make_batch(2)
    pil["pixels"] = np.stack(
        [np.asarray(gem.resize_rgb(Image.fromarray(p), (48, 64))) for p in originals]
    )
    ragged = dict(pil, pixels=np.empty(2, dtype=object))
    ragged["pixels"][:] = originals
    want, got = labeler(bank)(pil), labeler(bank, resize_on_device=True)(ragged)
    for i in range(2):
        np.testing.assert_array_equal(got["labels"][i], want["labels"][i])
        np.testing.assert_allclose(got["logits"][i], want["logits"][i], atol=2e-3)


@pytest.mark.parametrize("make_masks", [False, True])
def test_concurrent_calls_get_their_own_rows_one_forward_at_a_time(bank, make_masks):
    """Ray's concurrent actor calls (--actor-concurrency): every call gets the rows it gets
    alone, and the device work of one call runs at a time."""
    lab = labeler(bank, make_masks=make_masks)
    batches = [make_batch(3, errors=(1,) if s == 2 else (), seed=s) for s in range(8)]
    alone = [lab(batch) for batch in batches]
    forward, lock, running, most = lab.encode_image, threading.Lock(), [0], [0]

    def watched(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)  # a forward long enough for the other threads to try theirs
        try:
            return forward(x)
        finally:
            with lock:
                running[0] -= 1

    lab.encode_image = watched
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lab, batches))
    assert most[0] == 1
    for want, got in zip(alone, together, strict=True):
        assert list(got) == list(want) and list(got["key"]) == list(want["key"])
        for name in ("labels", "runs", "run_lengths", "error"):
            for a, b in zip(want.get(name, ()), got.get(name, ()), strict=True):
                np.testing.assert_array_equal(a, b)
        for name in ("scores", "logits"):
            for a, b in zip(want.get(name, ()), got.get(name, ()), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_jpegs_decoded_on_the_actor_label_as_decoded_on_the_cpu(bank, monkeypatch):
    """decode_jpegs_on_device: the `jpeg` column's images decoded here (on the CPU:
    libjpeg-turbo, PIL's pixels; on a GPU: nvJPEG's, a few levels off) give the rows of the
    same images decoded by the decode stage; a JPEG that fails here is a decode error row
    (one line, no stack trace) and the rest of the batch is labeled."""
    data = [image_bytes(100, 80, seed=1, exif_orientation=6), image_bytes(90, 70, seed=2)]
    data.append(image_bytes(60, 50, "png", seed=3))
    jpegs = [*data[:2], corrupt_huffman_jpeg(), None]
    rows = {
        "key": np.array(list("abcd"), dtype=object),
        "image": np.array([*data[:2], jpegs[2], data[2]], dtype=object),
        "image_ext": np.array(["jpg"] * 3 + ["png"], dtype=object),
        "shard": np.array(["s"] * 4, dtype=object),
        "error": np.array([None] * 4, dtype=object),
    }
    on_actor = decode_batch(rows, (48, 64), resize_to_model_input=False, leave_jpegs_to_actor=True)
    assert [j is not None for j in on_actor["jpeg"]] == [True, True, True, False]
    on_cpu = decode_batch(rows, (48, 64), resize_to_model_input=False)
    want = labeler(bank, resize_on_device=True)(on_cpu)
    got = labeler(bank, resize_on_device=True, decode_jpegs_on_device=True)(on_actor)
    error = got["error"][2]  # one line: on a GPU torch's message goes on with a stack trace
    assert error.startswith("decode: truncated or corrupt image data (JPEG): ")
    assert "\n" not in error and "frame #" not in error and len(error) < 200, error
    if not torch.cuda.is_available():  # libjpeg-turbo's reason (nvJPEG words it otherwise)
        assert error.endswith("(JPEG): Bogus Huffman table definition")
    assert want["error"][2].startswith("decode: truncated or corrupt image data (JPEG)")
    assert len(got["labels"][2]) == 0
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few levels
    jpeg_atol = 0.05 if torch.cuda.is_available() else 1e-6
    for i, atol in ((0, jpeg_atol), (1, jpeg_atol), (3, 1e-6)):
        assert got["error"][i] is None and got["width"][i] == want["width"][i]
        np.testing.assert_array_equal(got["labels"][i], want["labels"][i])
        np.testing.assert_allclose(got["logits"][i], want["logits"][i], rtol=1e-5, atol=atol)
    # a small budget of decoded pixels: one image per decode call, the same rows
    calls = []

    def counted(data, *args):
        calls.append(len(data))
        return decode_jpegs(data, *args)

    monkeypatch.setattr(pipeline.stages.label, "decode_jpegs", counted)
    monkeypatch.setattr(pipeline.stages.label, "JPEG_GROUP_PIXELS", 100 * 80)
    grouped = labeler(bank, resize_on_device=True, decode_jpegs_on_device=True)(on_actor)
    assert calls == [1, 1, 1]
    assert grouped["error"][2] == got["error"][2]
    for i in (0, 1, 3):
        np.testing.assert_array_equal(grouped["labels"][i], got["labels"][i])
        np.testing.assert_array_equal(grouped["logits"][i], got["logits"][i])
    # Ray stacks a column of equal shapes (here all placeholders) into one array
    stacked = {k: v[:2] for k, v in on_actor.items()}
    stacked["pixels"] = np.stack(list(stacked["pixels"]))
    again = labeler(bank, resize_on_device=True, decode_jpegs_on_device=True)(stacked)
    for i in (0, 1):
        np.testing.assert_array_equal(again["labels"][i], want["labels"][i])
