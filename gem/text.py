"""The text side: class names x templates -> normalized, averaged text embeddings."""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip import OPENAI_IMAGENET_TEMPLATES

Template = str | Callable[[str], str]
Templates = Sequence[Template]

SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)
IMAGENET_TEMPLATES: tuple[Callable[[str], str], ...] = tuple(OPENAI_IMAGENET_TEMPLATES)
TEMPLATES: dict[str, Templates] = {"single": SINGLE_TEMPLATE, "imagenet": IMAGENET_TEMPLATES}


def get_templates(name_or_templates: str | Templates) -> Templates:
    """Templates by name (`single`, `imagenet`) or as given (format strings or callables)."""
    if isinstance(name_or_templates, str):
        if name_or_templates not in TEMPLATES:
            raise ValueError(
                f"unknown templates {name_or_templates!r}; choose one of {list(TEMPLATES)}"
            )
        return TEMPLATES[name_or_templates]
    if not name_or_templates:
        raise ValueError("templates must not be empty")
    return tuple(name_or_templates)


def fill(template: Template, name: str) -> str:
    """One prompt: `template` applied to a class name."""
    return template(name) if callable(template) else template.format(name)


@torch.no_grad()
def encode_class_names(
    model: torch.nn.Module,
    tokenizer: Callable,
    class_names: Sequence[str],
    templates: str | Templates = SINGLE_TEMPLATE,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Text embeddings `[C, E]`: each name through every template, each prompt encoded
    and L2-normalized, averaged over templates, then normalized again (open_clip's
    zero-shot classifier recipe). Prompts are encoded in batches of `batch_size`."""
    templates = get_templates(templates)
    device = next(model.parameters()).device
    prompts = [fill(t, name) for name in class_names for t in templates]
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    embeds = torch.cat(chunks).view(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeds, dim=-1)
