"""Option choices that come from `gem`, read when argparse first needs them.

Importing `gem` imports torch and open_clip (seconds). These choices are read only when an
option that has them is given or its command's help is printed, so that `gemlabel status`,
`logs`, `stop`, `submit`, `view`, `report`, ... start without the model code. An option
with lazy choices needs a `metavar` (argparse lists the choices in the metavar otherwise,
when the option is added).
"""

from collections.abc import Callable, Iterator


class LazyChoices:
    """The values `load()` returns, loaded on first use (`in`, iteration, len)."""

    def __init__(self, load: Callable[[], list[str]]):
        self._load = load
        self._values: list[str] | None = None

    def _get(self) -> list[str]:
        if self._values is None:
            self._values = list(self._load())
        return self._values

    def __contains__(self, value: object) -> bool:
        return value in self._get()

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def _methods() -> list[str]:
    from gem import list_methods

    return list_methods()


def _templates() -> list[str]:
    from gem import TEMPLATES

    return list(TEMPLATES)


def _datasets() -> list[str]:
    from gem.eval import DATASETS

    return DATASETS


def _protocols() -> list[str]:
    from gem.eval import PROTOCOLS

    return list(PROTOCOLS)


METHODS = LazyChoices(_methods)  # gem.list_methods()
TEMPLATES = LazyChoices(_templates)  # gem.TEMPLATES
EVAL_DATASETS = LazyChoices(_datasets)  # gem.eval.DATASETS
EVAL_PROTOCOLS = LazyChoices(_protocols)  # gem.eval.PROTOCOLS
# the methods of gem.eval.PRESETS (named in `gemlabel eval --help`; a test checks the match)
PRESET_METHODS = ("sclip", "clearclip", "naclip")
