"""The labeling stage: one GEM model per actor; class selection and patch logits."""

import threading

import numpy as np
import ray
import torch
import torch.nn.functional as F

import gem
from pipeline.prompts import bank as prompt_bank
from pipeline.stages.decode import decode_jpegs
from pipeline.stages.masks import flat_masks_of, runs_of
from pipeline.stages.options import LabelOptions

BANK_CHUNK = 32768  # bank rows scored at once: bounds the [B, chunk] logits of huge banks
JPEG_GROUP_PIXELS = 2**27  # JPEG pixels decoded on the device at once (384 MiB of RGB)
# model-input pixels refined by PAMR at once: its image side holds ~54 floats per pixel
# (3 channels x 9 offsets x 2 dilations), 216 MiB here; its maps k + 1 floats per pixel, x3
REFINE_PIXELS = 2**20

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bank_embeddings(source, model: str, pretrained: str | None, seed: int) -> np.ndarray:
    """A Labeler's bank `[C, E]`: an array as given, a prompt bank file (refused when built
    for another model or weights), or a Ray object reference to an array."""
    if isinstance(source, str):
        bank = prompt_bank.load(source)
        prompt_bank.check_model(bank, model, pretrained, seed, source)
        return bank.embeddings
    if isinstance(source, ray.ObjectRef):
        return ray.get(source)
    return np.asarray(source)


def top_k_softmax(
    image: torch.Tensor, bank: torch.Tensor, scale: float, k: int, chunk: int = BANK_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest of softmax(scale * image @ bank.T) `[B, C]` and their class ids,
    computed `chunk` bank rows at a time (a running top-k, maximum and sum of exponentials:
    an online softmax), so memory is `[B, chunk + k]` whatever the bank size."""
    best = ids = peak = total = None
    for start in range(0, bank.shape[0], chunk):
        logits = scale * image @ bank[start : start + chunk].T
        values, index = logits.topk(min(k, logits.shape[1]), dim=-1)
        index += start
        if best is None:
            peak = values[:, :1]
            total = (logits - peak).exp().sum(-1, keepdim=True)
        else:
            new_peak = torch.maximum(peak, values[:, :1])
            total = total * (peak - new_peak).exp() + (logits - new_peak).exp().sum(-1, True)
            peak = new_peak
            values, keep = torch.cat([best, values], 1).topk(k, dim=-1)
            index = torch.cat([ids, index], 1).gather(1, keep)
        best, ids = values, index
    return (best - peak).exp() / total, ids


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` is bf16 (or fp16 without bf16 support) on CUDA, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in _DTYPES:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return _DTYPES[precision]


class Labeler:
    """A Ray Data callable class: GEM once per image, image-level scores against the whole
    prompt bank, the top-k classes above `score_threshold`, patch logits for those only.

    Scores are CLIP zero-shot probabilities: a softmax over the whole bank of the image
    embedding's cosine similarities, at the model's logit scale. `bank`: the embeddings, a
    prompt bank file path (pipeline.prompts.bank) or an object reference to the embeddings.
    In bf16/fp16 the model's weights are cast once (no per-op autocast casts); the
    temperature, the softmax over the bank and the patch logits stay in fp32.
    `options` (pipeline.stages.options.LabelOptions): with `make_masks` the masks are made
    here, on the actor's device, and their run lengths (`runs`, `run_lengths`) handed over
    instead of the logits (for GPU actors, whose CPU-side write stage would otherwise
    upsample every map). `resize_on_device`: the pixels arrive at their decoded sizes and
    are resized here, on the device (gem.resize_uint8). `decode_jpegs_on_device`: the JPEG
    bytes of the `jpeg` column are decoded here, on the device
    (pipeline.stages.decode.decode_jpegs); an image that fails is a decode error row.
    `templates`: the bank's, which encode the background prompts.
    `refine` "pamr": the kept classes' patch logits (raw cosine scores, and the background
    map) are upsampled bilinearly (align_corners=False) to the model input size and refined
    by `gem.pamr` against the normalised model input, in fp32 (`refine_maps`): the logits
    handed over are then `[k, H, W]` at `image_size`, which the masks are made from as from
    patch logits. PAMR runs at the model input resolution because those are the pixels the
    actor holds (the originals never reach it); the masks are then upsampled to the original
    size. Memory: top-k maps only (independent of the bank size), REFINE_PIXELS input
    pixels at a time.
    """

    def __init__(
        self,
        options: LabelOptions,
        bank: np.ndarray | str | ray.ObjectRef,
        templates: tuple[str, ...] = gem.SINGLE_TEMPLATE,
        progress=None,
    ):
        o = options
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.dtype = resolve_precision(o.precision, self.device)
        self.model = gem.create_gem_model(
            o.model, o.pretrained, device=self.device, method=o.method, seed=o.seed, **o.gem_options
        )
        cfg = getattr(self.model.visual, "preprocess_cfg", {})
        self.normalize = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
        bank = bank_embeddings(bank, o.model, o.pretrained, o.seed)
        self.bank = F.normalize(torch.tensor(bank, dtype=torch.float32), dim=-1)
        self.bank = self.bank.to(self.device)
        # background prompts (mask mode "background"): encoded here, with the bank's templates
        self.background = (
            self.model.encode_text(list(o.background), templates).to(self.device)
            if o.background
            else None
        )
        self.logit_scale = float(self.model.model.logit_scale.detach().exp())
        self.model.to(self.dtype)  # after the text encoding above, which stays in fp32
        self.top_k = min(o.top_k, self.bank.shape[0])
        self.score_threshold = o.score_threshold
        self.image_size = tuple(o.image_size)
        self.grid = self.model.grid_size(self.image_size)
        self.refine = o.refine
        # the maps handed over: patch logits, or refined maps at the model input size
        self.map_size = self.image_size if o.refine else tuple(self.grid)
        self.masks = (o.mask_threshold, o.mask_mode) if o.make_masks else None
        self.resize_on_device = o.resize_on_device
        self.decode_jpegs_on_device = o.decode_jpegs_on_device
        self.progress = progress  # pipeline.cluster.Progress, ticked once per batch
        self._device_lock = threading.Lock()
        # torch.compile fuses the elementwise work around attention (one compile per batch shape)
        self.encode_image = (
            torch.compile(self.model.encode_image) if o.compile else self.model.encode_image
        )

    def _host_batch(self, pixels: np.ndarray) -> tuple[torch.Tensor, list]:
        """The batch as one host tensor, pinned for a CUDA device, and with `resize_on_device` its
        layout: `[B, H, W, 3]`, or the host images flattened into one buffer (one
        host-to-device copy for the batch, then each image resized on the device) and per
        image its shape there, or the image itself when it is a tensor already decoded and
        resized on the device."""
        layout = []
        if self.resize_on_device:
            arrays = []
            for p in pixels:
                if not isinstance(p, torch.Tensor):
                    arrays.append(np.asarray(p).reshape(-1))
                    p = np.shape(p)
                layout.append(p)
            pixels = np.concatenate(arrays) if arrays else np.zeros(0, np.uint8)
        elif pixels.dtype == object:  # a ragged column: stacking fails loudly on a wrong size
            pixels = np.stack(list(pixels))
        x = torch.from_numpy(np.require(pixels, requirements=["C", "W"]))  # Ray: read-only
        return (x.pin_memory() if self.device.type == "cuda" else x), layout

    def _model_input(self, host: torch.Tensor, layout: list) -> torch.Tensor:
        return self._pixels(host, layout).to(self.dtype)

    def _pixels(self, host: torch.Tensor, layout: list) -> torch.Tensor:
        """The normalised model input `[B, 3, H, W]` on the device, in fp32."""
        x = host.to(self.device, non_blocking=True)
        if layout:
            images, start = [], 0
            for item in layout:
                if isinstance(item, torch.Tensor):  # decoded and resized here already
                    images.append(item)
                    continue
                size = int(np.prod(item))
                item, start = x[start : start + size].view(item), start + size
                images.append(gem.resize_uint8(item, self.image_size))
            x = torch.stack(images)
        return gem.normalize_uint8(x, **self.normalize)

    def _forward(self, host: torch.Tensor, layout: list) -> list[torch.Tensor | None]:
        """The model's part of `label`, on the device: kept counts `[B]`, scores and labels
        `[B, k]`, logits `[B, k, h, w]`, background map `[B, h, w]` or None (with `refine`:
        `[B, n, H, W]` and `[B, H, W]` at the model input size, n the most kept)."""
        pixels = self._pixels(host, layout)
        features = self.encode_image(pixels.to(self.dtype))
        image = F.normalize(features.image_embeds.float(), dim=-1)
        scores, labels = top_k_softmax(image, self.bank, self.logit_scale, self.top_k)
        # patch products only for the kept classes: [B, k, h, w], independent of the bank size
        patches = features.patch_embeds.float()
        logits = gem.patch_logits(patches, self.bank[labels])
        background = None
        if self.background is not None:
            background = gem.patch_logits(patches, self.background).amax(1)
        # top-k scores come sorted, so the kept classes are a prefix of each row
        kept = (scores >= self.score_threshold).sum(1)
        if self.refine == "pamr":
            if self.score_threshold > 0:  # maps of classes no image keeps: not refined
                logits = logits[:, : int(kept.max())]
            logits, background = refine_maps(pixels, logits, background)
        return [kept, scores, labels, logits, background]

    @torch.inference_mode()
    def label(self, pixels: np.ndarray, sizes: list[tuple[int, int]] | None = None) -> list[tuple]:
        """For `[B, H, W, 3]` uint8 images: per image (label ids, scores, logits `[k, h, w]`,
        background map `[h, w]`: the maximum over the background prompts' logits, or None).
        With `masks` set, the last two are the masks' run lengths (pipeline.stages.masks.runs_of)
        at each image's original `sizes` (height, width), made on the device.

        Calls may come from several threads (Ray's concurrent actor calls): the device work
        runs one call at a time (a lock), while other calls prepare their pinned host batch
        or wait for their results, so the device is not idle between batches."""
        host, layout = self._host_batch(pixels)
        with self._device_lock:
            kept, scores, labels, logits, background = self._forward(host, layout)
            runs = None
            if self.masks is not None:  # made on the device, their run lengths to the host
                kept_logits = [logits[i, :n] for i, n in enumerate(kept.tolist())]
                runs = runs_of(flat_masks_of(kept_logits, sizes, *self.masks, background))
            else:  # copies to the host, waited for after the lock
                logits, background = _to_host(logits), _to_host(background)
            kept, scores, labels = (_to_host(t) for t in (kept, scores, labels))
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record()
        if done is not None:
            done.synchronize()  # the next call's device work is queued meanwhile
        kept, scores, labels = kept.tolist(), scores.numpy(), labels.numpy()
        rows = [(labels[i, :n].astype(np.int32), scores[i, :n]) for i, n in enumerate(kept)]
        if runs is not None:
            return [(*row, *r) for row, r in zip(rows, runs, strict=True)]
        logits = logits.numpy()
        maps = [None] * len(kept) if background is None else background.numpy()
        return [(*rows[i], logits[i, :n], maps[i]) for i, n in enumerate(kept)]

    def _decode_jpegs(self, batch: dict[str, np.ndarray], errors: list) -> np.ndarray:
        """`pixels` with the images of the `jpeg` column decoded on the device and resized
        to the model input there, in groups of at most JPEG_GROUP_PIXELS decoded pixels
        (device memory stays bounded whatever the images' sizes; each group under the
        device lock, as other device work); a failure sets `errors`."""
        pixels = np.empty(len(errors), dtype=object)  # Ray stacks equal shapes: unstack
        pixels[:] = list(batch["pixels"])
        rows = [
            i for i, e in enumerate(errors) if e is None and isinstance(batch["jpeg"][i], bytes)
        ]
        groups, held = [], 0
        for i in rows:
            area = int(batch["width"][i]) * int(batch["height"][i])
            if not groups or held + area > JPEG_GROUP_PIXELS:
                groups.append([])
                held = 0
            groups[-1].append(i)
            held += area
        for group in groups:
            data = [batch["jpeg"][i] for i in group]
            orientations = [int(batch["orientation"][i]) for i in group]
            with self._device_lock:
                decoded = decode_jpegs(data, orientations, self.device)
                for i, image in zip(group, decoded, strict=True):
                    if isinstance(image, str):
                        errors[i] = f"decode: {image}"
                    else:
                        pixels[i] = gem.resize_uint8(image, self.image_size)
        return pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Ray hands an all-null string column over as NaN floats: only a str is an error
        errors = [e if isinstance(e, str) else None for e in batch["error"]]
        pixels = (
            self._decode_jpegs(batch, errors) if self.decode_jpegs_on_device else batch["pixels"]
        )
        ok = [i for i, e in enumerate(errors) if e is None]
        sizes = {i: (int(batch["height"][i]), int(batch["width"][i])) for i in ok}
        results: dict[int, tuple] = {}
        if ok:
            try:
                labeled = self.label(pixels[ok], [sizes[i] for i in ok])
                results = dict(zip(ok, labeled, strict=True))
            except Exception:  # isolate the sample(s) that fail, label the rest
                for i in ok:
                    try:
                        results[i] = self.label(pixels[i : i + 1], [sizes[i]])[0]
                    except Exception as err:
                        errors[i] = f"label: {type(err).__name__}: {err}"
        if self.masks is None:
            names = ("labels", "scores", "logits") + ("background",) * (self.background is not None)
            size = self.map_size
            empty = (np.zeros((0, *size), np.float32), np.zeros(size, np.float32))
        else:
            names = ("labels", "scores", "runs", "run_lengths")
            empty = (np.zeros(0, np.int32), np.zeros(0, np.int32))
        empty = (np.zeros(0, np.int32), np.zeros(0, np.float32), *empty)
        rows = [results.get(i, empty) for i in range(len(errors))]
        out = {name: batch[name] for name in ("shard", "key", "width", "height")}
        out["error"] = np.array(errors, dtype=object)
        out["node"] = np.array([self.node] * len(errors), dtype=object)
        for j, name in enumerate(names):
            column = np.empty(len(rows), dtype=object)
            column[:] = [r[j] for r in rows]
            out[name] = column
        if self.progress is not None:
            self.progress.tick.remote()
        return out


def refine_maps(
    images: torch.Tensor,
    logits: torch.Tensor,
    background: torch.Tensor | None = None,
    budget: int = REFINE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PAMR (`gem.pamr`, 10 iterations, dilations 8 and 16) of patch logits `[B, k, h, w]`
    (and a background map `[B, h, w]`, refined as one more map) against the normalised
    images `[B, 3, H, W]`: the maps are upsampled bilinearly (align_corners=False, as the
    masks are) to `(H, W)` first. Returns `[B, k, H, W]` (and `[B, H, W]`), fp32. Images go
    through PAMR a group of at most `budget` pixels at a time (at least one image)."""
    maps = logits.float()
    if background is not None:
        maps = torch.cat([maps, background.float()[:, None]], dim=1)
    size = tuple(images.shape[-2:])
    step = max(1, budget // (size[0] * size[1]))
    refined = maps.new_zeros((maps.shape[0], maps.shape[1], *size))
    if maps.shape[1]:  # no map kept: nothing to refine
        for i in range(0, maps.shape[0], step):
            group = gem.upsample(maps[i : i + step], size)
            refined[i : i + step] = gem.pamr(images[i : i + step].float(), group)
    if background is None:
        return refined, None
    return refined[:, :-1], refined[:, -1]


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """An asynchronous copy to the host (into pinned memory from a GPU), or None."""
    return None if t is None else t.to("cpu", non_blocking=True)
