"""RunConfig: everything `gemlabel run` takes, as one dataclass (also the Python API)."""

from dataclasses import asdict, dataclass, field

from pipeline.stages.decode import DEFAULT_MAX_PIXELS
from pipeline.stages.masks import MASK_MODES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MASK_STAGES = ("writer", "actor")
RESIZE_STAGES = ("decoder", "actor")
JPEG_STAGES = ("decoder", "actor")
REFINEMENTS = ("none", "pamr")  # "none" is stored as None

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


@dataclass
class RunConfig:
    """A labeling run. `inputs`: shard paths/URLs/globs/brace ranges; `vocab`: a built-in
    vocabulary name or class-name file/column (None with `bank`); `out`: output directory
    (local path or fsspec URL). See `gemlabel run --help`."""

    inputs: list[str]
    vocab: str | None
    out: str
    model: str = "gemlabel-tiny"
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
    seed: int = 0  # random weights when `pretrained` is None
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
        checks = [
            (
                self.refine is None or self.refine in REFINEMENTS,
                f"refine must be one of {REFINEMENTS}, got {self.refine!r}",
            ),
            (bool(self.inputs), "at least one input is required"),
            (
                bool(self.vocab or self.bank),
                "a vocabulary (--vocab) or a bank (--bank) is required",
            ),
            (self.mask_mode in MASK_MODES, f"mask_mode must be one of {MASK_MODES}"),
            (self.mask_stage in MASK_STAGES, f"mask_stage must be one of {MASK_STAGES}"),
            (self.resize_stage in RESIZE_STAGES, f"resize_stage must be one of {RESIZE_STAGES}"),
            (self.jpeg_stage in JPEG_STAGES, f"jpeg_stage must be one of {JPEG_STAGES}"),
            (
                self.jpeg_stage == "decoder" or self.resize_stage == "actor",
                "jpeg_stage actor needs resize_stage actor (the actor decodes those images, "
                "so it resizes them)",
            ),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}"),
            (self.top_k >= 1, "top_k must be >= 1"),
            (
                self.mask_mode != "background" or bool(self.background),
                "mask_mode background needs at least one background prompt",
            ),
            (0.0 < self.mask_threshold <= 1.0, "mask_threshold must lie in (0, 1]"),
            (0.0 <= self.max_error_rate <= 1.0, "max_error_rate must lie in [0, 1]"),
            (len(self.image_size) == 2 and min(self.image_size) > 0, "bad image_size"),
            (self.batch_size >= 1 and self.rows_per_file >= 1, "batch sizes must be >= 1"),
            (self.actors is None or self.actors >= 1, "actors must be >= 1"),
            (self.actor_concurrency >= 1, "actor_concurrency must be >= 1"),
            (self.stall_timeout > 0, "stall_timeout must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def output_settings(self) -> dict:
        """The settings that determine the output rows (JSON-ready)."""
        settings = {name: asdict(self)[name] for name in OUTPUT_SETTINGS}
        settings["image_size"] = list(self.image_size)
        settings["background"] = list(self.background)
        return settings
