"""The function-vector protocol on one task, from its spec (text or image demonstrations) to a
FunctionVector: mean head outputs over many clean prompts, each head's indirect effect on prompts
with shuffled labels, the top-k heads and their summed outputs."""

from __future__ import annotations

from dataclasses import replace

from taskvec.engine import attention_output_norm
from taskvec.function_vectors.indirect_effect import indirect_effects
from taskvec.function_vectors.means import mean_head_activations
from taskvec.function_vectors.prompts import cycled_queries, function_prompts
from taskvec.function_vectors.settings import PAPER_FUNCTION_VECTOR_SETTINGS, FunctionVectorSettings
from taskvec.function_vectors.vector import FunctionVector, function_vector, top_heads
from taskvec.models import ModelHandle
from taskvec.prompts import Prompt, as_template
from taskvec.prompts.settings import DEFAULT_PROMPT_SETTINGS, PromptSettings
from taskvec.tasks import Item, Task
from taskvec.vectors.spec import VectorSpec, parse_spec


def find_function_vector(
    handle: ModelHandle,
    task: Task,
    spec: VectorSpec | str = VectorSpec.TEXT_ICL,
    *,
    settings: FunctionVectorSettings = PAPER_FUNCTION_VECTOR_SETTINGS,
    prompts: PromptSettings = DEFAULT_PROMPT_SETTINGS,
    split: str = "val",
    memory_budget: int | None = None,
    progress: bool = False,
) -> FunctionVector:
    """The function vector of `task` from `spec`'s demonstrations (text-icl or image-icl), all
    prompts drawn from `split` with `prompts.seed`: means over `settings.mean_prompts` clean
    `settings.shots`-shot prompts, effects on `settings.effect_prompts` prompts with shuffled labels
    (their own seed stream), the top `settings.heads` heads. Of `prompts`, the seed, image style,
    template and batch size apply; the demonstrations per prompt are the protocol's `settings.shots`."""
    kind = parse_spec(spec)
    modality = kind.demo_modality
    if modality is None:
        raise ValueError(
            f"function vectors come from demonstrations (text-icl or image-icl), not {kind.value!r}"
        )
    mean_prompts, effect_prompts = settings.mean_prompts, settings.effect_prompts
    seed, batch_size = prompts.seed, prompts.batch_size
    chosen = as_template(prompts.template)
    protocol_prompts = replace(prompts, shots=settings.shots)
    pool = task.split(split)

    def prompts_of(queries: list[Item], prompt_seed: int, shuffle_labels: bool) -> list[Prompt]:
        return function_prompts(
            pool,
            queries,
            replace(protocol_prompts, seed=prompt_seed),
            modality=modality,
            shuffle_labels=shuffle_labels,
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
    heads = top_heads(effects.effects, settings.heads)
    metadata = {
        "kind": "function-vector",
        "model": handle.name,
        "task": task.name,
        "spec": kind.value,
        "shots": settings.shots,
        "seed": seed,
        "split": split,
        "style": prompts.style,
        "mean_prompts": mean_prompts,
        "effect_prompts": effect_prompts,
        "k": settings.heads,
        "heads": [list(head) for head in heads],
        # Where the heads' outputs pass through a norm before the residual, the vector is their
        # first-order effect through it (engine.heads_in_residual).
        "through_norm": any(attention_output_norm(handle, layer) is not None for layer, _ in heads),
        "position": "last token (heads averaged there); patched by adding at the query's last token",
        "template": {"query": chosen.query, "answer": chosen.answer, "format": chosen.name},
    }
    return FunctionVector(function_vector(handle, means, heads), heads, effects.effects, metadata)
