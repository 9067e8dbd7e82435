"""Benchmark: function vectors on the default LM (Gemma-3-270M), country-capital, text ICL.

1. Every head's causal indirect effect on 25 prompts with shuffled labels (10 shots), from head
   means over 100 clean prompts: the one-pass path (`indirect_effects`, all heads of a prompt as
   decode rows of one prefix pass) against the per-head loop of full forwards (`method="loop"`),
   timed in one process after a warm-up, with the largest difference of their effects.
2. The function vector of the top 10 heads, added at each layer with each of --scales to the bare
   validation queries ("Q:France\\nA:"): first-token accuracy per layer; at the best validation
   (layer, scale), test accuracy with the vector against no context.

    python bench/function_vectors.py
    python bench/function_vectors.py --threads 2 --loop-prompts 25
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--effect-prompts", type=int, default=25)
    parser.add_argument(
        "--loop-prompts", type=int, default=25, help="prompts the per-head loop is timed on (0: no loop)"
    )
    parser.add_argument("--task", default="country-capital")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from taskvec.engine import logit_lens, top_tokens
    from taskvec.evaluation import generate_answers, is_correct_by, sweep_accuracy
    from taskvec.function_vectors import (
        DEFAULT_MEAN_PROMPTS,
        DEFAULT_SHOTS,
        DEFAULT_TOP_HEADS,
        cycled_queries,
        function_prompts,
        function_vector,
        indirect_effects,
        mean_head_activations,
        top_heads,
    )
    from taskvec.models import load_model
    from taskvec.prompts import build_query_prompt
    from taskvec.prompts.settings import PromptSettings
    from taskvec.tasks import load_task

    torch.set_num_threads(args.threads)
    handle = load_model("default")
    task = load_task(args.task)
    pool = task.split("val")
    clean = function_prompts(
        pool, cycled_queries(pool, DEFAULT_MEAN_PROMPTS), PromptSettings(shots=DEFAULT_SHOTS, seed=0)
    )
    start = time.perf_counter()
    means = mean_head_activations(handle, clean)
    means_seconds = time.perf_counter() - start
    queries = cycled_queries(pool, args.effect_prompts)
    shuffled = function_prompts(
        pool, queries, PromptSettings(shots=DEFAULT_SHOTS, seed=1), shuffle_labels=True
    )
    answers = [query.output for query in queries]
    indirect_effects(handle, shuffled[:2], answers[:2], means)  # warm-up
    start = time.perf_counter()
    fast = indirect_effects(handle, shuffled, answers, means)
    one_pass_seconds = time.perf_counter() - start
    loop_count = min(args.loop_prompts, len(shuffled))
    loop_seconds, difference = float("nan"), float("nan")
    if loop_count:
        start = time.perf_counter()
        slow = indirect_effects(handle, shuffled[:loop_count], answers[:loop_count], means, method="loop")
        loop_seconds = (time.perf_counter() - start) * len(shuffled) / loop_count
        difference = float((fast.per_prompt[:loop_count] - slow.per_prompt).abs().max())

    heads = top_heads(fast.effects, DEFAULT_TOP_HEADS)
    vector = function_vector(handle, means, heads)
    val_prompts = [build_query_prompt(item) for item in pool]
    vectors = vector.expand(handle.num_layers, -1)
    val_answers = [item.answers() for item in pool]
    by_scale = {
        scale: sweep_accuracy(handle, val_prompts, val_answers, vectors, mode="add", scale=scale)
        for scale in args.scales
    }
    scale, layer = max(
        ((scale, layer) for scale in args.scales for layer in range(handle.num_layers)),
        key=lambda pair: by_scale[pair[0]][pair[1]],
    )
    test = task.split("test")
    test_prompts = [build_query_prompt(item) for item in test]
    test_answers = [item.answers() for item in test]
    with_vector = sweep_accuracy(handle, test_prompts, test_answers, vectors, mode="add", scale=scale)
    plain = generate_answers(handle, test_prompts, max_new_tokens=1)
    no_context = sum(
        is_correct_by(text, item.answers(), "prefix") for text, item in zip(plain, test, strict=True)
    ) / len(test)
    result = {
        "heads": handle.num_layers * int(fast.effects.shape[1]),
        "effect_prompts": len(shuffled),
        "head_means_seconds": means_seconds,
        "one_pass_seconds": one_pass_seconds,
        "loop_seconds": loop_seconds,
        "loop_timed_on": loop_count,
        "ratio": loop_seconds / one_pass_seconds,
        "max_effect_difference": difference,
        "top_heads": heads,
        "vector_norm": float(vector.norm()),
        "vector_top_tokens": [token for token, _ in top_tokens(handle, logit_lens(handle, vector)[None])[0]],
        "val_accuracy_per_layer_by_scale": by_scale,
        "scale": scale,
        "layer": layer,
        "test_accuracy_at_layer": with_vector[layer],
        "test_no_context": no_context,
        "test_items": len(test),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['heads']} heads x {len(shuffled)} prompts, {args.threads} threads")
    print(f"  head means over {DEFAULT_MEAN_PROMPTS} prompts: {means_seconds:.1f} s")
    print(f"  one pass: {one_pass_seconds:.2f} s   per-head loop: {loop_seconds:.1f} s", end="")
    print(f" (timed on {loop_count})   ratio {result['ratio']:.1f}x   max |difference| {difference:.1e}")
    print(f"  top heads (layer, head): {heads}")
    print(f"  vector norm {result['vector_norm']:.1f}, decodes as {result['vector_top_tokens']}")
    for each, accuracies in by_scale.items():
        print(
            f"  validation accuracy per layer, added x{each:g}: " + " ".join(f"{a:.2f}" for a in accuracies)
        )
    print(
        f"  test at layer {layer}, x{scale:g}: {with_vector[layer]:.2f} with the function vector, "
        f"{no_context:.2f} without context ({len(test)} items)"
    )


if __name__ == "__main__":
    main()
