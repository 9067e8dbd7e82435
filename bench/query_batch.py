"""Benchmark: bare (patched) image queries generated in batches of 8 vs `RunConfig.query_batch_size`.

Most of a `taskvec run`'s test generations are bare queries: no context, every patched condition, the
whole ensemble curve. Each is "Q:<image>\\nA:" (22 tokens on the default VLM), so a batch of 8 is
small next to the per-forward overhead. This times both batch sizes on the same queries, one run,
and checks the answers are identical.

    python bench/query_batch.py                     # default VLM, 96 country-capital test queries
    python bench/query_batch.py --queries 32 --sizes 8 16 32 64
"""

from __future__ import annotations

import argparse
import time

import torch

from taskvec.evaluation import generate_answers
from taskvec.models import load_model
from taskvec.prompts import build_query_prompt
from taskvec.tasks import load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default-vlm")
    parser.add_argument("--task", default="country-capital")
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    handle = load_model(args.model)
    items = load_task(args.task).split("test")[: args.queries]
    prompts = [build_query_prompt(item, modality="image") for item in items]
    # Any vector exercises the patch path; its cost does not depend on its values.
    vector = torch.randn(handle.hidden_size, generator=torch.Generator().manual_seed(0))
    generate_answers(handle, prompts[:4], vector=vector, layer=args.layer, max_new_tokens=1)  # warm-up
    seconds, answers = {}, {}
    for size in args.sizes:
        started = time.perf_counter()
        answers[size] = generate_answers(
            handle, prompts, vector=vector, layer=args.layer, max_new_tokens=1, batch_size=size
        )
        seconds[size] = time.perf_counter() - started
    reference = args.sizes[0]
    for size in args.sizes:
        same = answers[size] == answers[reference]
        print(
            f"batch {size:3d}: {seconds[size]:6.2f} s for {len(prompts)} queries, "
            f"{seconds[size] / len(prompts) * 1000:5.1f} ms/query, "
            f"{seconds[reference] / seconds[size]:4.2f}x vs batch {reference}, same answers: {same}"
        )


if __name__ == "__main__":
    main()
