"""The prompt bank: a vocabulary's normalized text embeddings as one portable file, and the
cache that builds each bank once.

File format: Parquet, one row per class (`id` int32, `name` string: the vocabulary entry,
synonyms joined by "; ", `embedding` fixed_size_list<float32>[E], L2-normalized) and, in the
file's key-value metadata under `gemlabel.prompt_bank`, JSON with the model, weights, seed,
templates, vocabulary hash and format version. Parquet because pyarrow is already a core
dependency, the file is self-describing, readable by any Arrow/Parquet tool, readable
straight from object stores (fsspec URLs), and never unpickled.

The cache file name is `<model>-<key>.parquet`, `key` hashing (model, weights, seed for
random weights, templates, vocabulary hash); it is written to a temporary name and renamed,
so concurrent builders never expose a partial file.
"""

import hashlib
import json
import logging
import os
import posixpath
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from open_clip import CLIP
from open_clip.tokenizer import SimpleTokenizer, get_clean_fn
from open_clip.transformer import text_global_pool
from tqdm import tqdm

import gem
from pipeline.prompts.vocab import synonyms, vocabulary_hash
from pipeline.storage.store import split_file
from pipeline.weights import RANDOM_WEIGHTS

logger = logging.getLogger(__name__)
SORT_WINDOW = 65536  # prompts tokenized, then length-sorted, at once (~40 MB of tokens)

FORMAT = "gemlabel.prompt_bank/1"
METADATA_KEY = b"gemlabel.prompt_bank"
CACHE_ENV = "GEMLABEL_BANK_CACHE"


class BankMismatchError(ValueError):
    """A prompt bank built for another model or weights than the run's."""


@dataclass(frozen=True)
class PromptBank:
    """Vocabulary entries, their embeddings `[C, E]` (float32, L2-normalized; row i is class
    id i), and what they were built from."""

    names: list[str]
    embeddings: np.ndarray
    model: str
    pretrained: str | None
    seed: int
    templates: tuple[str, ...]
    vocabulary_hash: str

    @property
    def key(self) -> str:
        return bank_key(
            self.model, self.pretrained, self.seed, self.templates, self.vocabulary_hash
        )


def resolve_templates(spec: str) -> tuple[str, ...]:
    """Format strings with `{}`: `single`, `imagenet` (open_clip's 80) or a file with one
    template per line (blank lines and `#` comments skipped)."""
    if spec in gem.TEMPLATES:
        return tuple(t("{}") if callable(t) else t for t in gem.TEMPLATES[spec])
    if not os.path.isfile(spec) and "://" not in spec:
        raise ValueError(
            f"templates {spec!r}: not one of {list(gem.TEMPLATES)} nor a template file"
        )
    with fsspec.open(spec, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    templates = tuple(t for t in lines if t and not t.startswith("#"))
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(
            f"template file {spec}: each line must hold one '{{}}' for the class name"
            + (f" (bad: {bad[:3]})" if bad else " (none found)")
        )
    return templates


def bank_key(
    model: str, pretrained: str | None, seed: int, templates: tuple[str, ...], vocab_hash: str
) -> str:
    """The cache key: what the embeddings depend on (the seed only for random weights; for
    a local checkpoint also its size and modification time, so a replaced file rebuilds)."""
    pretrained = gem.resolve_weights(model, pretrained)
    weights: list = [pretrained]
    if pretrained is not None and os.path.isfile(pretrained):
        stat = os.stat(pretrained)
        weights += [stat.st_size, stat.st_mtime_ns]
    ident = [model, weights, seed if pretrained is None else None, list(templates), vocab_hash]
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def _spliceable(prefix: str, name: str, suffix: str) -> bool:
    """True when CLIP's BPE tokens of prefix + name + suffix are the pieces' tokens joined:
    the name starts and ends alphanumeric and whitespace or punctuation separates it."""
    return (
        name[:1].isalnum()
        and name[-1:].isalnum()
        and (not prefix or prefix[-1].isspace())
        and (not suffix or suffix[0].isspace() or not (suffix[0].isalnum() or suffix[0] in "'_"))
    )


def tokenize(tokenizer, pairs: list[tuple[str, str]]) -> torch.Tensor:
    """Tokens `[N, context]` of the prompts `template.format(name)` for (template, name)
    pairs. With open_clip's plain BPE tokenizer, template pieces and names are encoded once
    each and joined (the same tokens; tokenizing every prompt anew dominates large builds),
    truncated as the tokenizer truncates; other tokenizers get the formatted prompts."""
    plain = isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None
    if not plain or tokenizer.clean_fn is not get_clean_fn("lower"):
        return tokenizer([template.format(name) for template, name in pairs])
    encode = lru_cache(maxsize=None)(tokenizer.encode)
    length = tokenizer.context_length
    out = np.zeros((len(pairs), length), dtype=np.int64)
    for i, (template, name) in enumerate(pairs):
        prefix, _, suffix = template.partition("{}")
        if _spliceable(prefix, name, suffix):
            ids = encode(prefix) + encode(name) + encode(suffix)
        else:
            ids = encode(template.format(name))
        ids = [tokenizer.sot_token_id, *ids[: length - 2], tokenizer.eot_token_id]
        out[i, : len(ids)] = ids
    return torch.from_numpy(out)


def encode_text(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`clip.encode_text(tokens)`, for open_clip's CLIP text tower (causal mask, pooling at
    the end token) run on the tokens up to the batch's longest prompt only: the padding
    after it cannot change the pooled outputs, and prompts are far shorter than 77 tokens."""
    causal = isinstance(clip, CLIP) and clip.attn_mask is not None
    if not causal or clip.text_pool_type != "argmax":
        return clip.encode_text(tokens)
    n = int((tokens != 0).sum(1).max())
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens[:, :n]).to(cast) + clip.positional_embedding[:n].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:n, :n]))
    x = text_global_pool(x, tokens[:, :n], "argmax")
    return x @ clip.text_projection if clip.text_projection is not None else x


@torch.no_grad()
def encode(
    clip: torch.nn.Module,
    tokenizer,
    names: list[str],
    templates: tuple[str, ...],
    batch_size: int = 512,
    progress: bool = True,
) -> np.ndarray:
    """Embeddings `[C, E]`: every synonym of every entry through every template, each
    distinct prompt encoded once and L2-normalized, averaged per class, normalized again."""
    prompt_ids: dict[str, int] = {}
    pairs = []  # (template, name) of each distinct prompt
    owner = []  # (class index, prompt index) pairs
    for c, entry in enumerate(names):
        for name in synonyms(entry):
            for template in templates:
                prompt = template.format(name)
                if prompt not in prompt_ids:
                    prompt_ids[prompt] = len(pairs)
                    pairs.append((template, name))
                owner.append((c, prompt_ids[prompt]))
    device = next(clip.parameters()).device
    order, encoded = [], []
    with tqdm(
        total=len(pairs),
        unit="prompt",
        desc=f"prompt bank ({len(names)} classes)",
        disable=not progress,
        mininterval=1 if sys.stderr.isatty() else 30,
    ) as bar:
        # Tokenize a window at a time and encode it sorted by length: each batch then runs
        # on few padding tokens (encode_text cuts the batch at its longest prompt).
        for first in range(0, len(pairs), SORT_WINDOW):
            tokens = tokenize(tokenizer, pairs[first : first + SORT_WINDOW])
            by_length = torch.argsort((tokens != 0).sum(1), stable=True)
            for batch in by_length.split(batch_size):
                embeds = encode_text(clip, tokens[batch].to(device))
                encoded.append(F.normalize(embeds.float(), dim=-1).cpu())
                order.append(batch + first)
                bar.update(len(batch))
    prompt_embeds = torch.empty(len(pairs), encoded[0].shape[1])
    prompt_embeds[torch.cat(order)] = torch.cat(encoded)
    index = torch.tensor(owner, dtype=torch.long)
    sums = torch.zeros(len(names), prompt_embeds.shape[1]).index_add_(
        0, index[:, 0], prompt_embeds[index[:, 1]]
    )
    return F.normalize(sums, dim=-1).numpy().astype(np.float32)


def build(
    names: list[str],
    model: str,
    pretrained: str | None = None,
    templates: str = "single",
    seed: int = 0,
    batch_size: int = 512,
    progress: bool = True,
    device: str | None = None,
) -> PromptBank:
    """Encode `names` with the text tower of `model`/`pretrained` (see gem.create_clip) on
    `device` (default: CUDA when available, else CPU)."""
    resolved = resolve_templates(templates)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    clip, tokenizer = gem.create_clip(model, pretrained, device=device, seed=seed)
    started = time.perf_counter()
    embeddings = encode(clip, tokenizer, names, resolved, batch_size, progress)
    logger.info(
        "prompt bank: %d classes x %d templates encoded in %.1f s on %s",
        len(names),
        len(resolved),
        time.perf_counter() - started,
        device,
    )
    return PromptBank(names, embeddings, model, pretrained, seed, resolved, vocabulary_hash(names))


def _metadata(bank: PromptBank) -> dict:
    return {
        "format": FORMAT,
        "model": bank.model,
        "pretrained": bank.pretrained,
        "seed": bank.seed,
        "templates": list(bank.templates),
        "vocabulary_hash": bank.vocabulary_hash,
        "key": bank.key,
        "classes": len(bank.names),
        "dim": int(bank.embeddings.shape[1]),
    }


def save(bank: PromptBank, path: str) -> None:
    """Write `bank` to `path` (local or fsspec URL) atomically (pipeline.storage.store)."""
    count, dim = bank.embeddings.shape
    flat = pa.array(np.ascontiguousarray(bank.embeddings, dtype=np.float32).reshape(-1))
    table = pa.table(
        {
            "id": pa.array(np.arange(count, dtype=np.int32)),
            "name": pa.array(bank.names, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(flat, dim),
        }
    ).replace_schema_metadata({METADATA_KEY: json.dumps(_metadata(bank)).encode()})
    store, name = split_file(path)
    store.write_table(name, table)


def load(path: str) -> PromptBank:
    """Read a bank written by `save` (local path or fsspec URL)."""
    store, name = split_file(path)
    table = store.read_table(name)
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    meta = json.loads(raw) if raw else {}
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a gemlabel prompt bank ({FORMAT}); build one with "
            "`gemlabel prompts build`"
        )
    column = table.column("embedding").combine_chunks()
    embeddings = column.flatten().to_numpy().reshape(len(table), meta["dim"])
    return PromptBank(
        names=table.column("name").to_pylist(),
        embeddings=embeddings.astype(np.float32, copy=False),
        model=meta["model"],
        pretrained=meta["pretrained"],
        seed=meta["seed"],
        templates=tuple(meta["templates"]),
        vocabulary_hash=meta["vocabulary_hash"],
    )


def check_weights(model: str, pretrained: str | None) -> None:
    """Raise ValueError (naming the flags) unless the weights were asked for: a model that
    neither ships its weights nor names them (hf-hub:, local-dir:) needs `--pretrained`
    (a tag, a checkpoint, or "random"), and a model that ships its weights takes no
    "random". `pretrained` as given, after pipeline.weights.default_pretrained."""
    bundled = model in gem.factory.BUNDLED_WEIGHTS
    if pretrained == RANDOM_WEIGHTS and bundled:
        raise ValueError(
            f"--pretrained random: --model {model} ships its own weights; leave out --pretrained"
        )
    if pretrained is None and not bundled and not model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"--model {model} has no default weights: pass --pretrained TAG (open_clip's, e.g. "
            "laion2b_s34b_b88k for ViT-B-16) or a checkpoint path, or --pretrained random for "
            "seeded random weights (for tests: their masks mean nothing)"
        )


def check_model(bank: PromptBank, model: str, pretrained: str | None, seed: int, path: str):
    """Raise BankMismatchError unless `bank` was built with this model and these weights."""
    built = (bank.model, bank.pretrained, bank.seed if bank.pretrained is None else None)
    wanted = (model, pretrained, seed if pretrained is None else None)
    if built != wanted:

        def describe(m, p, s):
            return f"model {m} with " + (f"weights {p}" if p else f"random weights (seed {s})")

        raise BankMismatchError(
            f"prompt bank {path} was built for {describe(*built)}, but this run uses "
            f"{describe(*wanted)}: its text embeddings would not match the image embeddings. "
            "Build a bank for this model (gemlabel prompts build --model ... --pretrained ...) "
            "or leave out --bank to build one in the cache."
        )


def default_cache_dir() -> str:
    """$GEMLABEL_BANK_CACHE, else $XDG_CACHE_HOME/gemlabel/banks (~/.cache/gemlabel/banks)."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gemlabel", "banks")


def cache_path(cache_dir: str, model: str, key: str) -> str:
    """Where the bank with `key` lives in `cache_dir`."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(model))
    return posixpath.join(cache_dir, f"{safe}-{key}.parquet")


def cached(
    names: list[str],
    model: str,
    pretrained: str | None = None,
    templates: str = "single",
    seed: int = 0,
    cache_dir: str | None = None,
) -> tuple[PromptBank, str]:
    """The bank of `names` for this model and templates, and its file: loaded from the
    cache when there, else built and stored there."""
    cache_dir = cache_dir or default_cache_dir()
    key = bank_key(model, pretrained, seed, resolve_templates(templates), vocabulary_hash(names))
    path = cache_path(cache_dir, model, key)
    try:
        bank = load(path)  # one GET: a miss is FileNotFoundError
    except FileNotFoundError:
        pass
    else:
        logger.info("prompt bank: cache hit %s", path)
        return bank, path
    logger.info("prompt bank: cache miss, building %s", path)
    bank = build(names, model, pretrained, templates, seed)
    save(bank, path)
    return bank, path
