"""What each stage is told: the options of decode, label and write as dataclasses, and the
choices they take. Plain data (no torch, PIL or Ray): `pipeline.config.RunConfig` builds
them, once per run, and the stages read them."""

from dataclasses import dataclass, field

DEFAULT_MAX_PIXELS = 64_000_000  # larger images are error rows (decompression-bomb guard)
MASK_MODES = ("threshold", "semantic", "background")
REFINEMENTS = ("none", "pamr")  # "none" is stored as None


@dataclass(frozen=True)
class DecodeOptions:
    """`pipeline.stages.decode.decode_batch`'s keyword arguments.

    `resize_to_model_input`: resize here, on the CPU, to `image_size`; False hands each image
    over at its decoded size for the labeling actor to resize. `leave_jpegs_to_actor` (with
    `resize_to_model_input` False): plain JPEGs are not decoded here but handed over as bytes
    for the actor to decode on its device."""

    image_size: tuple[int, int]
    max_pixels: int = DEFAULT_MAX_PIXELS
    resize_to_model_input: bool = True
    leave_jpegs_to_actor: bool = False


@dataclass(frozen=True)
class LabelOptions:
    """What `pipeline.stages.label.Labeler` is built with, besides its bank.

    `make_masks`: the actor makes the masks (at `mask_threshold`, `mask_mode`) and hands over
    their run lengths instead of logits. `resize_on_device`: pixels arrive at their decoded
    sizes and are resized on the actor's device. `decode_jpegs_on_device` (needs
    `resize_on_device`): the `jpeg` column's bytes are decoded on the device. `background`:
    the prompts competing with the kept classes (mask mode "background"; empty otherwise).
    `refine`: None or "pamr". Checked by RunConfig, not again here."""

    model: str
    pretrained: str | None
    method: str
    top_k: int
    score_threshold: float
    image_size: tuple[int, int]
    gem_options: dict = field(default_factory=dict)
    precision: str = "auto"
    seed: int = 0
    compile: bool = False
    background: tuple[str, ...] = ()
    make_masks: bool = False
    mask_threshold: float = 0.5
    mask_mode: str = "threshold"
    resize_on_device: bool = False
    decode_jpegs_on_device: bool = False
    refine: str | None = None


@dataclass(frozen=True)
class WriteOptions:
    """`pipeline.stages.write.write_batch`'s keyword arguments besides the output: the class
    names of the label ids, and how masks are made from logits."""

    class_names: list[str]
    mask_threshold: float
    mask_mode: str


@dataclass(frozen=True)
class Batching:
    """Rows per call of each stage, and the labeling actors' concurrent calls."""

    decode: int
    label: int
    write: int  # also the rows per output file
    actor_concurrency: int
