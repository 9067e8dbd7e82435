"""The function-vector protocol's settings (Todd et al. 2024), declared once with `option`: the
`heads` command's flags, the run's `--fv-*` flags (nested with a prefix) and `find_function_vector`'s
argument."""

from __future__ import annotations

from dataclasses import dataclass

from taskvec.options import at_least, option

# Todd et al.'s settings: 10-shot prompts, means over 100 of them, effects on 25, 10 heads.
DEFAULT_SHOTS = 10
DEFAULT_MEAN_PROMPTS = 100
DEFAULT_EFFECT_PROMPTS = 25
DEFAULT_TOP_HEADS = 10


@dataclass(frozen=True)
class FunctionVectorSettings:
    """Prompts and heads of the function-vector protocol; the prompts' seed, image style, template
    and batch size are the caller's `PromptSettings`."""

    shots: int = option(
        DEFAULT_SHOTS, "demonstrations per prompt of the function-vector protocol", parse=at_least(1)
    )
    mean_prompts: int = option(
        DEFAULT_MEAN_PROMPTS, "in-context prompts each head's mean output is taken over", parse=at_least(1)
    )
    effect_prompts: int = option(
        DEFAULT_EFFECT_PROMPTS,
        "prompts with shuffled labels each head's indirect effect is measured on",
        parse=at_least(1),
    )
    heads: int = option(
        DEFAULT_TOP_HEADS,
        "top heads (by indirect effect) summed into a function vector",
        parse=at_least(1),
        metavar="K",
    )
    scales: tuple[float, ...] = option(
        (1.0, 2.0, 4.0, 8.0),
        "scales a function vector is added with; the validation sweep picks the best (scale, layer)",
        metavar="X",
    )


PAPER_FUNCTION_VECTOR_SETTINGS = FunctionVectorSettings()
