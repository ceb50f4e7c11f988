"""RunConfig: everything `gemlabel run` takes, as one dataclass (also the Python API),
checked once when it is made, and the stage options built from it. Imports no torch."""

from dataclasses import asdict, dataclass, field

from pipeline.stages.options import (
    DEFAULT_MAX_PIXELS,
    MASK_MODES,
    REFINEMENTS,
    Batching,
    DecodeOptions,
    LabelOptions,
    WriteOptions,
)
from pipeline.weights import DEFAULT_MODEL, RANDOM_WEIGHTS, default_pretrained, gem_pretrained

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASK_STAGES = ("writer", "actor")
RESIZE_STAGES = ("decoder", "actor")
JPEG_STAGES = ("decoder", "actor")

# The settings that change the output rows: a resumed run must use the same ones.
OUTPUT_SETTINGS = (
    "model",
    "pretrained",
    "method",
    "gem_options",
    "refine",
    "templates",
    "top_k",
    "score_threshold",
    "mask_threshold",
    "mask_mode",
    "background",
    "image_size",
    "max_pixels",
    "precision",
    "seed",
)


def flag(name: str) -> str:
    """The `gemlabel run` flag of a RunConfig field: top_k -> --top-k."""
    return "--" + name.replace("_", "-")


@dataclass
class RunConfig:
    """A labeling run. `inputs`: shard paths/URLs/globs/brace ranges; `vocab`: a built-in
    vocabulary name or class-name file/column (None with `bank`); `out`: output directory
    (local path or fsspec URL). See `gemlabel run --help`, whose defaults are these."""

    inputs: list[str]
    vocab: str | None
    out: str
    model: str = DEFAULT_MODEL
    # weights: an open_clip tag or a checkpoint; "random": seeded random weights; None: the
    # model's own (ViT-B-16: the paper's laion2b_s34b_b88k; a bundled model: its own)
    pretrained: str | None = None
    method: str = "gem"
    gem_options: dict = field(default_factory=dict)
    refine: str | None = None  # "pamr": PAMR on the top-k maps at the model input size
    templates: str = "single"
    top_k: int = 5
    score_threshold: float = 0.0
    mask_threshold: float = 0.5
    mask_mode: str = "threshold"
    mask_stage: str = "writer"  # where masks are made: CPU write tasks or the labeling actor
    resize_stage: str = "decoder"  # where images are resized: CPU decode tasks or the actor
    jpeg_stage: str = "decoder"  # where plain JPEGs are decoded: CPU decode tasks or the actor
    background: tuple[str, ...] = ("background",)  # prompts of mask mode "background"
    image_size: tuple[int, int] = (448, 448)
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"
    seed: int = 0  # of pretrained "random"
    compile: bool = False  # torch.compile the image forward in each actor
    batch_size: int = 32
    actors: int | None = None  # None: one per GPU, or 1 without GPUs
    gpus_per_actor: float | None = None  # None: 1 if the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    actor_concurrency: int = 2  # batches in flight in each model actor (see Labeler.label)
    decode_batch_size: int = 32
    rows_per_file: int = 512
    num_cpus: int | None = None  # embedded Ray only; None: all cores
    address: str | None = None
    stall_timeout: float = 600.0  # seconds without progress before the run is ended
    scale_timeout: float = 900.0  # seconds to wait for an autoscaler to add what it needs
    max_error_rate: float = 0.5
    min_error_samples: int = 100
    overwrite: bool = False
    vocab_column: str | None = None  # CSV/Parquet column of `vocab`
    bank: str | None = None  # a prebuilt prompt bank file (gemlabel prompts build)
    bank_cache: str | None = None  # None: $GEMLABEL_BANK_CACHE or ~/.cache/gemlabel/banks

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(v) for v in self.image_size)
        self.background = tuple(self.background)
        if self.refine == "none":
            self.refine = None
        self.pretrained = default_pretrained(self.model, self.pretrained)
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        """(holds, message naming the flag) for every rule of a usable configuration."""

        def one_of(name: str, choices: tuple[str, ...]) -> tuple[bool, str]:
            value = getattr(self, name)
            return value in choices, f"{flag(name)} must be one of {choices}, got {value!r}"

        def at_least_1(name: str) -> tuple[bool, str]:
            return getattr(self, name) >= 1, f"{flag(name)} must be >= 1"

        return [
            one_of("refine", REFINEMENTS) if self.refine else (True, ""),
            (bool(self.inputs), "at least one INPUT is required"),
            (
                bool(self.vocab or self.bank),
                "a vocabulary (--vocab) or a bank (--bank) is required",
            ),
            one_of("mask_mode", MASK_MODES),
            one_of("mask_stage", MASK_STAGES),
            one_of("resize_stage", RESIZE_STAGES),
            one_of("jpeg_stage", JPEG_STAGES),
            (
                self.jpeg_stage == "decoder" or self.resize_stage == "actor",
                "--jpeg-stage actor needs --resize-stage actor (the actor decodes those images, "
                "so it resizes them)",
            ),
            one_of("precision", PRECISIONS),
            at_least_1("top_k"),
            (
                self.mask_mode != "background" or bool(self.background),
                "--mask-mode background needs at least one background prompt (--background)",
            ),
            (0.0 < self.mask_threshold <= 1.0, "--mask-threshold must lie in (0, 1]"),
            (0.0 <= self.max_error_rate <= 1.0, "--max-error-rate must lie in [0, 1]"),
            (
                len(self.image_size) == 2 and min(self.image_size) > 0,
                f"--image-size must be positive, got {self.image_size}",
            ),
            at_least_1("batch_size"),
            at_least_1("decode_batch_size"),
            at_least_1("rows_per_file"),
            (self.actors is None or self.actors >= 1, "--actors must be >= 1"),
            at_least_1("actor_concurrency"),
            (self.stall_timeout > 0, "--stall-timeout must be > 0"),
            (self.scale_timeout > 0, "--scale-timeout must be > 0"),
        ]

    @property
    def weights(self) -> str | None:
        """What the model loads: the tag or checkpoint; None for seeded random weights or a
        bundled model's own (pipeline.weights)."""
        return gem_pretrained(self.pretrained)

    @property
    def random_weights(self) -> bool:
        return self.pretrained == RANDOM_WEIGHTS

    def output_settings(self) -> dict:
        """The settings that determine the output rows (JSON-ready)."""
        settings = {name: asdict(self)[name] for name in OUTPUT_SETTINGS}
        settings["image_size"] = list(self.image_size)
        settings["background"] = list(self.background)
        return settings

    def decode_options(self) -> DecodeOptions:
        """The decode stage's options."""
        return DecodeOptions(
            image_size=self.image_size,
            max_pixels=self.max_pixels,
            resize_to_model_input=self.resize_stage == "decoder",
            leave_jpegs_to_actor=self.jpeg_stage == "actor",
        )

    def label_options(self) -> LabelOptions:
        """The labeling actors' options."""
        return LabelOptions(
            model=self.model,
            pretrained=self.weights,
            method=self.method,
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            image_size=self.image_size,
            gem_options=self.gem_options,
            precision=self.precision,
            seed=self.seed,
            compile=self.compile,
            background=self.background if self.mask_mode == "background" else (),
            make_masks=self.mask_stage == "actor",
            mask_threshold=self.mask_threshold,
            mask_mode=self.mask_mode,
            resize_on_device=self.resize_stage == "actor",
            decode_jpegs_on_device=self.jpeg_stage == "actor",
            refine=self.refine,
        )

    def batching(self) -> Batching:
        """Rows per call of each stage."""
        return Batching(
            self.decode_batch_size, self.batch_size, self.rows_per_file, self.actor_concurrency
        )

    def write_options(self, class_names: list[str]) -> WriteOptions:
        """The write stage's options, with the class names of the run's bank."""
        return WriteOptions(class_names, self.mask_threshold, self.mask_mode)
