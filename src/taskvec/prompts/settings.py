"""How in-context prompts are drawn and batched: one set of settings for every command and function
that builds them (the vectors, function vectors, demo, lens), declared once with `option`."""

from __future__ import annotations

from dataclasses import dataclass

from taskvec.options import at_least, option
from taskvec.prompts.template import TEMPLATE_HELP, TemplateName


@dataclass(frozen=True)
class PromptSettings:
    """Demonstrations per prompt, their seed, the image style, the prompt template and the batch size."""

    shots: int = option(5, "demonstrations per prompt", parse=at_least(1))
    seed: int = option(0, "seed of the demonstrations drawn for each prompt")
    style: str | None = option(None, "image style of image prompts (default: each item's first)")
    template: TemplateName = option("qa", TEMPLATE_HELP)
    batch_size: int = option(8, "prompts per forward batch", parse=at_least(1))


DEFAULT_PROMPT_SETTINGS = PromptSettings()
