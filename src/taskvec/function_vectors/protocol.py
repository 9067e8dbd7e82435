"""The function-vector protocol on one task, from its spec (text or image demonstrations) to a
FunctionVector: mean head outputs over many clean prompts, each head's indirect effect on prompts
with shuffled labels, the top-k heads and their summed outputs."""

from __future__ import annotations

from taskvec.engine import attention_output_norm
from taskvec.function_vectors.indirect_effect import indirect_effects
from taskvec.function_vectors.means import mean_head_activations
from taskvec.function_vectors.prompts import cycled_queries, function_prompts
from taskvec.function_vectors.vector import FunctionVector, function_vector, top_heads
from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Prompt, QATemplate, TemplateName, as_template
from taskvec.tasks import Item, Task
from taskvec.vectors.spec import VectorSpec, parse_spec

# Todd et al.'s settings: 10-shot prompts, means over 100 of them, effects on 25, 10 heads.
DEFAULT_SHOTS = 10
DEFAULT_MEAN_PROMPTS = 100
DEFAULT_EFFECT_PROMPTS = 25
DEFAULT_TOP_HEADS = 10


def find_function_vector(
    handle: ModelHandle,
    task: Task,
    spec: VectorSpec | str = VectorSpec.TEXT_ICL,
    *,
    shots: int = DEFAULT_SHOTS,
    mean_prompts: int = DEFAULT_MEAN_PROMPTS,
    effect_prompts: int = DEFAULT_EFFECT_PROMPTS,
    k: int = DEFAULT_TOP_HEADS,
    seed: int = 0,
    split: str = "val",
    style: str | None = None,
    template: QATemplate | TemplateName = DEFAULT_TEMPLATE,
    batch_size: int = 8,
    memory_budget: int | None = None,
    progress: bool = False,
) -> FunctionVector:
    """The function vector of `task` from `spec`'s demonstrations (text-icl or image-icl), all
    prompts drawn from `split` with `seed`: means over `mean_prompts` clean `shots`-shot prompts,
    effects on `effect_prompts` prompts with shuffled labels (their own seed stream), top `k` heads."""
    kind = parse_spec(spec)
    modality = kind.demo_modality
    if modality is None:
        raise ValueError(
            f"function vectors come from demonstrations (text-icl or image-icl), not {kind.value!r}"
        )
    chosen = as_template(template)
    pool = task.split(split)

    def prompts_of(queries: list[Item], prompt_seed: int, shuffle_labels: bool) -> list[Prompt]:
        return function_prompts(
            pool,
            queries,
            shots=shots,
            seed=prompt_seed,
            modality=modality,
            shuffle_labels=shuffle_labels,
            style=style,
            template=chosen,
            task=task.name,
        )

    clean = prompts_of(cycled_queries(pool, mean_prompts), seed, False)
    means = mean_head_activations(
        handle, clean, batch_size=batch_size, progress=f"head means {task.name}" if progress else None
    )
    queries = cycled_queries(pool, effect_prompts)
    shuffled = prompts_of(queries, seed + 1, True)  # a seed stream of their own
    effects = indirect_effects(
        handle,
        shuffled,
        [query.output for query in queries],
        means,
        batch_size=max(1, batch_size // 4),
        memory_budget=memory_budget,
        progress=f"head effects {task.name}" if progress else None,
    )
    heads = top_heads(effects.effects, k)
    metadata = {
        "kind": "function-vector",
        "model": handle.name,
        "task": task.name,
        "spec": kind.value,
        "shots": shots,
        "seed": seed,
        "split": split,
        "style": style,
        "mean_prompts": mean_prompts,
        "effect_prompts": effect_prompts,
        "k": k,
        "heads": [list(head) for head in heads],
        # Where the heads' outputs pass through a norm before the residual, the vector is their
        # first-order effect through it (engine.heads_in_residual).
        "through_norm": any(attention_output_norm(handle, layer) is not None for layer, _ in heads),
        "position": "last token (heads averaged there); patched by adding at the query's last token",
        "template": {"query": chosen.query, "answer": chosen.answer, "format": chosen.name},
    }
    return FunctionVector(function_vector(handle, means, heads), heads, effects.effects, metadata)
