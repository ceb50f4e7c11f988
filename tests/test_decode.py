"""Decode stage: member choice, every kind of bad or odd image, the batch contract."""

import io
import os
import pickle
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFile, ImageOps

import gem
from gem import transforms
from pipeline.stages import decode
from pipeline.stages.decode import (
    DecodeError,
    decode_batch,
    decode_image,
    decode_scaled,
    pick_image_member,
    to_rgb,
)
from pipeline.stages.read import read_shard
from tests.shards import (
    animated_gif_bytes,
    bomb_png_bytes,
    corrupt_huffman_jpeg,
    image_bytes,
    payload_path,
    pickle_payload,
    rgb_image,
    write_bad_corpus,
    write_shard,
)

SIZE = (24, 32)  # (H, W) model input


def read_tar(path: str) -> dict[str, np.ndarray]:
    """A read-stage batch of a whole shard, from the pipeline's reader."""
    table = pa.concat_tables(read_shard(path))
    return {
        name: np.array(table.column(name).to_pylist(), dtype=object) for name in table.column_names
    }


def one(data: bytes | None, error: str | None = None) -> dict[str, np.ndarray]:
    col = np.empty(1, dtype=object)
    col[0] = data
    return {
        "shard": np.array(["s.tar"], dtype=object),
        "key": np.array(["k"], dtype=object),
        "image": col,
        "image_ext": np.array(["png"], dtype=object),
        "error": np.array([error], dtype=object),
    }


def solid(mode: str, size: tuple[int, int], color, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format=fmt, **save)
    return out.getvalue()


def rgb_of(data: bytes) -> tuple[int, ...]:
    return decode_image(data).getpixel((0, 0))


# ---------------------------------------------------------------- the bad-input corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad")
    shards, expected = write_bad_corpus(directory)
    return directory, shards, expected


def test_bad_corpus_every_sample_gets_its_expected_outcome(corpus):
    directory, shards, expected = corpus
    seen = set()
    for shard in shards:
        out = decode_batch(read_tar(shard), SIZE, max_pixels=10_000_000)
        assert set(out) == {"shard", "key", "error", "width", "height", "pixels"}
        assert out["pixels"].shape == (len(out["key"]), *SIZE, 3)
        assert out["pixels"].dtype == np.uint8
        for i, key in enumerate(out["key"]):
            want = expected[(shard, key)]
            seen.add((shard, key))
            error, size = out["error"][i], (out["width"][i], out["height"][i])
            if want.stage == "ok":
                assert error is None, key
                assert size == want.size, key
                assert out["pixels"][i].any(), key
            else:
                assert error.startswith(f"{want.stage}: "), (key, error)
                assert want.message in error, (key, error)
                assert size == (0, 0)
                assert not out["pixels"][i].any()
    assert seen == set(expected)
    assert not payload_path(directory).exists()


def test_bad_corpus_messages(corpus):
    _, shards, _ = corpus
    out = decode_batch(read_tar(shards[0]), SIZE, max_pixels=10_000_000)
    errors = dict(zip(out["key"], out["error"], strict=True))
    assert errors["bomb"] == (
        "decode: image has 400000000 pixels, over the limit of 10000000 (decompression bomb guard)"
    )
    assert errors["zero_bytes"] == "decode: empty image data (0 bytes)"
    assert errors["not_an_image"].startswith("decode: cannot identify image file (210 bytes")
    assert errors["truncated_jpg"].startswith("decode: truncated or corrupt image data (JPEG)")
    assert errors["no_image"] == "read: no image member (members: json, txt)"
    assert errors["only_pickles"] == "read: no image member (members: pickle, pyd)"


def test_corpus_payload_is_real_and_never_runs(corpus, tmp_path):
    directory, shards, _ = corpus
    with tarfile.open(shards[0]) as tar:
        payload = tar.extractfile("only_pickles.pyd").read()
    assert payload == pickle_payload(payload_path(directory))
    assert not payload_path(directory).exists()
    # the payload does what it claims when unpickled (here, pointed at a scratch dir)
    pickle.loads(pickle_payload(tmp_path / "ran"))
    assert (tmp_path / "ran").exists()


def test_missing_shard_is_listed_but_absent(corpus):
    _, shards, expected = corpus
    assert expected[(shards[2], "")].stage == "read"
    assert [k for k in expected if k[0] == shards[2]] == [(shards[2], "")]


# ---------------------------------------------------------------- colours and modes


def test_exif_orientation_swaps_and_rotates():
    # stored 8x4: left half red, right half blue; orientation 6 = rotate 90 degrees clockwise
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    image.paste((0, 0, 255), (4, 0, 8, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="PNG", exif=exif.tobytes())
    rotated = decode_image(out.getvalue())
    assert rotated.size == (4, 8)
    assert rotated.getpixel((0, 0)) == (255, 0, 0)  # the left side is now on top
    assert rotated.getpixel((0, 7)) == (0, 0, 255)


def test_exif_orientation_8_in_batch():
    out = decode_batch(one(image_bytes(50, 20, exif_orientation=8)), SIZE)
    assert (out["width"][0], out["height"][0], out["error"][0]) == (20, 50, None)


@pytest.mark.parametrize(
    ("mode", "color", "fmt", "want"),
    [
        ("L", 77, "PNG", (77, 77, 77)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("RGB", (10, 200, 30), "WEBP", None),  # lossy: checked with a tolerance below
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("RGBA", (255, 0, 0, 0), "PNG", (255, 255, 255)),  # transparent -> white
        ("RGBA", (0, 0, 255, 255), "PNG", (0, 0, 255)),
        ("LA", (0, 0), "PNG", (255, 255, 255)),
        ("F", 0.5, "TIFF", (128, 128, 128)),  # float in [0, 1] is scaled by 255
        ("F", 300.0, "TIFF", (255, 255, 255)),  # otherwise clipped
    ],
)
def test_modes_to_rgb(mode, color, fmt, want):
    got = rgb_of(solid(mode, (6, 4), color, fmt))
    if want is None:
        assert np.allclose(got, color, atol=4)
    else:
        assert got == want


def test_rgba_half_alpha_composites_on_white():
    r, g, b = rgb_of(solid("RGBA", (4, 4), (255, 0, 0, 128)))
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_cmyk_jpeg():
    assert np.allclose(
        rgb_of(solid("CMYK", (16, 16), (0, 255, 255, 0), "JPEG")), (255, 0, 0), atol=8
    )


def test_palette_and_palette_transparency():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    out = io.BytesIO()
    image.save(out, format="PNG")
    assert rgb_of(out.getvalue()) == (10, 200, 30)
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=1)
    assert rgb_of(out.getvalue()) == (255, 255, 255)


def test_16_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 1000, 32896, 65535]], dtype="<u2")
    out = io.BytesIO()
    Image.frombytes("I;16", (4, 1), values.tobytes()).save(out, format="PNG")
    image = Image.open(io.BytesIO(out.getvalue()))
    assert image.mode == "I;16"
    got = np.asarray(decode_image(out.getvalue()))[0, :, 0]
    assert got.tolist() == [0, 4, 128, 255]


def test_32_bit_integer_mode_read_as_16_bit():
    assert to_rgb(Image.new("I", (2, 2), 32896)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("I", (2, 2), -5)).getpixel((0, 0)) == (0, 0, 0)
    assert to_rgb(Image.new("I", (2, 2), 1 << 20)).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_first_frame():
    image = decode_image(animated_gif_bytes(8, 6, [(255, 0, 0), (0, 0, 255), (0, 255, 0)]))
    assert image.size == (8, 6)
    assert image.mode == "RGB"
    assert image.getpixel((3, 3)) == (255, 0, 0)


def test_every_output_is_rgb():
    for mode in ("RGB", "L", "P", "RGBA", "LA", "I;16"):
        assert decode_image(image_bytes(20, 10, "png", mode)).mode == "RGB"
    assert decode_image(image_bytes(20, 10, "jpeg", "CMYK")).mode == "RGB"
    assert decode_image(image_bytes(20, 10, "tiff", "CMYK")).mode == "RGB"


# ---------------------------------------------------------------- limits and failures


def test_pixel_limit_is_checked_before_loading(monkeypatch):
    data = image_bytes(40, 30, "png")
    assert decode_image(data, max_pixels=1200).size == (40, 30)
    with pytest.raises(DecodeError, match=r"^image has 1200 pixels, over the limit of 1199 "):
        decode_image(data, max_pixels=1199)

    def no_load(self):
        raise AssertionError("pixels loaded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    with pytest.raises(DecodeError, match="decompression bomb guard"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(DecodeError, match="image has 400000000 pixels"):
        decode_image(bomb_png_bytes(), max_pixels=1000)


def test_limit_holds_whatever_the_global_pil_state(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DecodeError, match="image has 400000000 pixels"):
        decode_image(bomb_png_bytes(), max_pixels=1_000_000)
    data = image_bytes(160, 120, "jpeg", seed=1)
    with pytest.raises(DecodeError, match="truncated"):
        decode_image(data[: len(data) * 3 // 4])
    assert Image.MAX_IMAGE_PIXELS is None  # and the globals are put back
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_pil_guards_hold_until_the_last_overlapping_decode_ends(monkeypatch):
    """Decodes overlap in concurrent actor calls: one ending must not put PIL's globals back
    under another still running; the last one restores them."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    first, second = decode._pil_guards(1000), decode._pil_guards(5000)
    first.__enter__()
    second.__enter__()
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (5000, False)
    first.__exit__(None, None, None)  # the first decode ends while the second still runs
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (5000, False)
    second.__exit__(None, None, None)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (None, True)


def test_decodes_in_threads(monkeypatch):
    """Good, truncated and bomb images decoded from four threads at once: each gets its own
    outcome, and PIL's globals are back afterwards."""
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    saved = Image.MAX_IMAGE_PIXELS
    good = image_bytes(160, 120, "jpeg", seed=1)
    cases = [(good, "ok"), (good[: len(good) // 2], "truncated"), (bomb_png_bytes(), "bomb")]

    def outcome(data: bytes) -> str:
        try:
            return "ok" if decode_image(data, max_pixels=1_000_000).size == (160, 120) else "?"
        except DecodeError as e:
            return "bomb" if "decompression bomb" in str(e) else str(e).split()[0]

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(outcome, [data for data, _ in cases] * 40))
    assert got == [want for _, want in cases] * 40
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == (saved, True)


def test_our_limit_governs_not_pils_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 60,000
    assert decode_image(image_bytes(300, 200, "png"), max_pixels=60_000).size == (300, 200)
    assert decode_image(animated_gif_bytes(300, 200, [(1, 2, 3)]), 60_000).size == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image data"),
        (b"GIF89a", "cannot"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "cannot identify image file"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "cannot"),
    ],
)
def test_undecodable_bytes(data, message):
    with pytest.raises(DecodeError, match=message):
        decode_image(data)


def test_truncated_png():
    data = image_bytes(64, 64, "png", seed=3)
    with pytest.raises(DecodeError, match="truncated or corrupt image data"):
        decode_image(data[: len(data) // 2])


# ---------------------------------------------------------------- reduced-scale JPEG decode


def test_large_jpeg_is_decoded_reduced_but_reports_its_full_size():
    data = image_bytes(400, 300, "jpeg", seed=6)
    image, full = decode_scaled(data, min_size=(60, 90))  # 400 // 90 = 4, 300 // 60 = 5: 1/4
    assert image.size == (100, 75) and full == (400, 300) and image.mode == "RGB"
    want = np.asarray(gem.resize_rgb(decode_image(data), (60, 90))).astype(int)
    diff = np.abs(np.asarray(gem.resize_rgb(image, (60, 90))).astype(int) - want)
    assert diff.mean() < 2
    assert decode_scaled(data, min_size=(300, 400))[0].size == (400, 300)  # no room: full
    png = image_bytes(400, 300, "png", seed=6)
    assert decode_scaled(png, min_size=(60, 90)) == (decode_image(png), (400, 300))


def test_reduced_scale_is_chosen_in_the_displayed_orientation():
    # stored 400 x 200, orientation 6: shown 200 x 400. For a 180 (H) x 40 (W) input the
    # shown image allows 1/2 (400 // 180); the stored one read unrotated would allow none.
    data = image_bytes(400, 200, "jpeg", seed=7, exif_orientation=6)
    image, full = decode_scaled(data, min_size=(180, 40))
    assert image.size == (100, 200) and full == (200, 400)


@pytest.mark.parametrize("where", [(Image.Image, "getexif"), (ImageOps, "exif_transpose")])
def test_unreadable_exif_keeps_the_stored_orientation_and_size(where, monkeypatch):
    """PIL shrugs off most corrupt EXIF; when reading or applying it does raise, the image
    is decoded as stored (no transpose) and its stored size is the one reported."""

    def unreadable(*args):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(*where, unreadable)
    data = image_bytes(400, 200, "jpeg", seed=7, exif_orientation=6)
    image, full = decode_scaled(data)
    assert image.size == (400, 200) and full == (400, 200)


def test_truncated_large_jpeg_fails_at_a_reduced_scale_too():
    data = image_bytes(400, 300, "jpeg", seed=8)
    with pytest.raises(DecodeError, match="truncated"):
        decode_scaled(data[: len(data) // 2], min_size=(20, 20))


def test_decode_batch_keeps_full_sizes_of_reduced_jpegs():
    data = image_bytes(400, 300, "jpeg", seed=6)
    out = decode_batch(one(data), SIZE)  # (24, 32): 1/8
    assert (out["width"][0], out["height"][0]) == (400, 300)
    want = np.asarray(gem.resize_rgb(decode_image(data), SIZE)).astype(int)
    assert np.abs(out["pixels"][0].astype(int) - want).mean() < 2
    out = decode_batch(one(data), SIZE, resize_to_model_input=False)
    assert out["pixels"][0].shape == (38, 50, 3)
    assert (out["width"][0], out["height"][0]) == (400, 300)


# ---------------------------------------------------------------- member choice


def test_pick_image_member_preference():
    png, jpg = b"png", b"jpg"
    assert pick_image_member({"png": png, "jpg": jpg, "json": b"{}"}) == ("jpg", jpg)
    assert pick_image_member({"webp": b"w", "png": png}) == ("png", png)
    assert pick_image_member({"seg.png": b"s", "tiff": b"t"}) == ("tiff", b"t")
    assert pick_image_member({"JPG": jpg, "txt": b""}) == ("JPG", jpg)
    assert pick_image_member({"mask.png": b"m", "image.jpg": b"i"}) == ("image.jpg", b"i")


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"json": b"{}", "pyd": b"x"}, "no image member (members: json, pyd)"),
        ({}, "no image member (members: none)"),
        ({"txt": b"", "pickle": b""}, "no image member (members: pickle, txt)"),
    ],
)
def test_pick_image_member_none(members, message):
    with pytest.raises(ValueError) as info:
        pick_image_member(members)
    assert str(info.value) == message


# ---------------------------------------------------------------- decode_batch contract


def test_decode_batch_resizes_like_gem():
    data = image_bytes(70, 50, "png", seed=4)
    out = decode_batch(one(data), SIZE)
    pixels = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB")))
    assert np.array_equal(out["pixels"][0], gem.resize_uint8(pixels, SIZE).numpy())
    assert (out["width"][0], out["height"][0]) == (70, 50)


def test_decode_batch_without_resize_keeps_each_size_for_the_actor():
    batch = one(image_bytes(70, 50, "png", seed=4))
    for name in batch:
        batch[name] = np.concatenate([batch[name], one(b"not an image")[name]])
    out = decode_batch(batch, SIZE, resize_to_model_input=False)
    want = np.asarray(Image.open(io.BytesIO(batch["image"][0])).convert("RGB"))
    assert np.array_equal(out["pixels"][0], want) and out["pixels"][0].shape == (50, 70, 3)
    assert out["error"][1].startswith("decode: ") and out["pixels"][1].shape == (1, 1, 3)


@pytest.mark.parametrize(
    ("size", "target"),
    [
        ((70, 50), SIZE),
        ((640, 480), SIZE),
        ((33, 57), (448, 448)),
        ((1, 1), SIZE),
        ((640, 480), (448, 448)),
    ],
)
def test_torch_resize_is_within_two_levels_of_pil(size, target):
    """The CPU's uint8 kernel (the decode stage), and the float passes that GPUs run."""
    image = Image.open(io.BytesIO(image_bytes(*size, "png", seed=5))).convert("RGB")
    want = np.asarray(gem.resize_rgb(image, target)).astype(int)
    pixels = torch.from_numpy(np.array(image))
    got = gem.resize_uint8(pixels, target)
    assert got.dtype == torch.uint8 and got.shape == (*target, 3)
    diff = np.abs(got.numpy().astype(int) - want)
    assert diff.max() <= 2 and (diff > 0).mean() < 0.02  # < 1% at model input sizes
    floats = transforms._resize_float(pixels.permute(2, 0, 1)[None], *target)[0].permute(1, 2, 0)
    assert floats.dtype == torch.uint8 and floats.shape == (*target, 3)
    diff = np.abs(floats.numpy().astype(int) - want)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_decode_batch_passes_incoming_errors_untouched():
    batch = one(image_bytes(10, 10), error="read: broken tar")
    batch["extra"] = np.array([7])
    out = decode_batch(batch, SIZE)
    assert out["error"][0] == "read: broken tar"
    assert (out["width"][0], out["height"][0]) == (0, 0)
    assert not out["pixels"].any()
    assert out["extra"][0] == 7
    assert "image" not in out and "image_ext" not in out


def test_decode_batch_missing_image_and_unexpected_failures(monkeypatch):
    assert decode_batch(one(None), SIZE)["error"][0] == "decode: no image data"
    # Ray turns an all-null column into float NaN
    batch = one(image_bytes(10, 10))
    batch["error"] = np.array([np.nan], dtype=np.float32)
    assert decode_batch(batch, SIZE)["error"][0] is None
    batch["image"] = np.array([np.nan], dtype=np.float32)
    assert decode_batch(batch, SIZE)["error"][0] == "decode: no image data"

    def boom(data, max_pixels, min_size):
        raise RuntimeError("boom")

    monkeypatch.setattr(decode, "decode_scaled", boom)
    assert decode_batch(one(b"x"), SIZE)["error"][0] == "decode: RuntimeError: boom"


def test_decode_batch_mixed_rows(tmp_path):
    shard = write_shard(
        tmp_path / "mixed.tar",
        [
            ("a", {"jpg": image_bytes(33, 57, seed=1)}),
            ("b", {"jpg": b"not a jpeg"}),
            ("c", {"png": image_bytes(640, 480, "png", seed=2)}),
        ],
    )
    out = decode_batch(read_tar(shard), SIZE)
    assert out["error"][0] is None and out["error"][2] is None
    assert out["error"][1].startswith("decode: cannot identify image file")
    assert out["width"].tolist() == [33, 0, 640]
    assert out["height"].tolist() == [57, 0, 480]
    assert out["pixels"][0].any() and not out["pixels"][1].any() and out["pixels"][2].any()


def test_cpu_resize_does_not_depend_on_the_cpu(tmp_path):
    """torch's uint8 kernel has an AVX2 path and a generic one: the same pixels from both,
    so a cluster of mixed nodes gives the same rows."""
    pixels = np.random.default_rng(6).integers(0, 256, (120, 170, 3), dtype=np.uint8)
    np.save(tmp_path / "in.npy", pixels)
    code = (
        "import sys, numpy as np, torch, gem; "
        "x = torch.from_numpy(np.load(sys.argv[1])); "
        "np.save(sys.argv[2], gem.resize_uint8(x, (96, 64)).numpy())"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    args = [sys.executable, "-c", code, str(tmp_path / "in.npy"), str(tmp_path / "out.npy")]
    subprocess.run(args, env=env, check=True)
    generic = np.load(tmp_path / "out.npy")
    assert np.array_equal(generic, gem.resize_uint8(torch.from_numpy(pixels), (96, 64)).numpy())


@pytest.mark.parametrize("orientation", range(10))
def test_exif_orient_matches_pil(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image.getexif()[0x0112] = orientation
    want = np.asarray(ImageOps.exif_transpose(image))
    got = decode.exif_orient(torch.from_numpy(pixels), orientation).numpy()
    np.testing.assert_array_equal(got, want)


def test_probe_device_jpeg_takes_only_plain_complete_jpegs():
    assert decode.probe_device_jpeg(image_bytes(64, 48)) == (64, 48, 1)
    assert decode.probe_device_jpeg(image_bytes(64, 48, exif_orientation=6)) == (48, 64, 6)
    assert decode.probe_device_jpeg(image_bytes(64, 48, mode="L")) == (64, 48, 1)
    progressive = io.BytesIO()
    rgb_image(64, 48).save(progressive, format="JPEG", progressive=True)
    data = image_bytes(64, 48)
    for other in (
        image_bytes(64, 48, "png"),
        image_bytes(64, 48, mode="CMYK"),
        progressive.getvalue(),
        data[: len(data) // 2],  # truncated: no EOI marker; PIL names the damage
        b"",
        b"not an image \xff\xd9",
    ):
        assert decode.probe_device_jpeg(other) is None
    assert decode.probe_device_jpeg(data, max_pixels=64 * 48 - 1) is None  # PIL says why


def test_decode_jpegs_gives_pils_pixels_and_isolates_a_bad_one():
    """On the CPU (libjpeg-turbo, as PIL): the same pixels as decode_image, in the EXIF
    orientation; a broken image in the batch is an error message, the others decode."""
    good = [
        image_bytes(64, 48, seed=2),
        image_bytes(64, 48, seed=3, exif_orientation=6),
        image_bytes(40, 30, mode="L", seed=4),
    ]
    probed = [decode.probe_device_jpeg(d) for d in good]
    cpu = torch.device("cpu")
    got = decode.decode_jpegs(good, [o for _, _, o in probed], cpu)
    for image, data, (w, h, _) in zip(got, good, probed, strict=True):
        assert image.shape == (h, w, 3) and image.is_contiguous()
        np.testing.assert_array_equal(image.numpy(), np.asarray(decode_image(data)))
    mixed = decode.decode_jpegs([good[0], corrupt_huffman_jpeg(), good[1]], [1, 1, 6], cpu)
    assert mixed[1] == "truncated or corrupt image data (JPEG): Bogus Huffman table definition"
    np.testing.assert_array_equal(mixed[0].numpy(), got[0].numpy())
    np.testing.assert_array_equal(mixed[2].numpy(), got[1].numpy())


def test_jpeg_error_reason_is_one_line():
    """torchvision's GPU decode error goes on with a C++ stack trace (seen on an H200); the
    error row keeps the first line's last clause."""
    gpu = RuntimeError(
        "Error while decoding JPEG images: Failed to decode batch: 3\nException raised from "
        "decode_images at decode_jpegs_cuda.cpp:494 (most recent call first):\nframe #0: "
        "c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f in libc10.so)"
    )
    reason = "Error while decoding JPEG images: Failed to decode batch: 3"
    assert decode._jpeg_reason(gpu) == reason
    cpu = RuntimeError("Unsupported marker type 0x61, Bogus Huffman table definition")
    assert decode._jpeg_reason(cpu) == "Bogus Huffman table definition"
    assert decode._jpeg_reason(RuntimeError()) == "RuntimeError"


def test_decode_batch_leaves_plain_jpegs_to_the_actor():
    samples = [
        image_bytes(64, 48, seed=1, exif_orientation=8),
        image_bytes(64, 48, "png", seed=2),
        image_bytes(64, 48, mode="CMYK", seed=3),
        b"junk",
    ]
    batch = {
        "shard": np.array(["s"] * 4, dtype=object),
        "key": np.array(list("abcd"), dtype=object),
        "image": np.array(samples, dtype=object),
        "image_ext": np.array(["jpg", "png", "jpg", "jpg"], dtype=object),
        "error": np.array([None] * 4, dtype=object),
    }
    out = decode_batch(batch, SIZE, resize_to_model_input=False, leave_jpegs_to_actor=True)
    assert out["jpeg"][0] == samples[0] and list(out["jpeg"][1:]) == [None] * 3
    assert out["orientation"].tolist() == [8, 1, 1, 1]
    assert out["width"].tolist() == [48, 64, 64, 0] and out["height"].tolist() == [64, 48, 48, 0]
    assert out["pixels"][0].shape == (1, 1, 3) and out["pixels"][1].shape == (48, 64, 3)
    assert out["error"][3].startswith("decode: cannot identify")
    assert "jpeg" not in decode_batch(batch, SIZE, resize_to_model_input=False)
