"""Task conflict: prompt the model for task A, patch task B's vector, see whose answer comes out.

If a task vector carries the task, patching B's vector over the query's answer position should
turn an A prompt (A's demonstrations or A's instruction) into a B answer. Pairs share their inputs
(country-capital vs country-currency, animal-latin vs animal-young, food-color vs food-flavor), so
every query has an answer under both tasks. Counts without the patch are kept as the baseline.

Answers are scored by the run's protocol (the paper's): one greedy token, prefix match; a token
that starts both answers counts as "both".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import permutations
from typing import Any

import torch

from taskvec.analysis.prompt_sets import query_items, spec_prompts
from taskvec.evaluation import generate_answers, is_correct, is_correct_by
from taskvec.models import ModelHandle
from taskvec.prompts import as_template
from taskvec.prompts.settings import DEFAULT_PROMPT_SETTINGS, PromptSettings
from taskvec.tasks import Item, Task
from taskvec.vectors import VectorSpec, parse_spec

# How task A is given to the model: its text demonstrations, or its instruction.
CONFLICT_CONTEXTS = (VectorSpec.TEXT_ICL, VectorSpec.INSTRUCTION)
OUTCOMES = ("a", "b", "both", "neither")


@dataclass
class ConflictExample:
    """One query: its input, both tasks' answers, and what the model said without and with B's vector."""

    input: str
    answer_a: str
    answer_b: str
    baseline: str
    patched: str


@dataclass
class ConflictCounts:
    """Outcome counts over `items` queries; each count dict sums to `items`."""

    task_a: str
    task_b: str
    context: str
    layer: int
    items: int
    baseline: dict[str, int]  # A's prompt alone
    patched: dict[str, int]  # A's prompt with B's vector at `layer`
    ambiguous_skipped: int  # queries whose A and B answers cannot be told apart
    examples: list[ConflictExample] = field(default_factory=list)
    max_new_tokens: int = 1  # tokens generated per answer
    metric: str = "prefix"  # how an answer is matched (taskvec.evaluation.is_correct_by)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def winner(generated: str, answers_a: Sequence[str], answers_b: Sequence[str], metric: str = "prefix") -> str:
    """ "a", "b", "both" (a short answer that is a prefix of both) or "neither"."""
    a, b = is_correct_by(generated, answers_a, metric), is_correct_by(generated, answers_b, metric)
    return "both" if a and b else "a" if a else "b" if b else "neither"


def shared_input_pairs(tasks: Sequence[Task], min_shared: int = 2) -> list[tuple[Task, Task]]:
    """Ordered pairs (A, B) of tasks whose inputs overlap in at least `min_shared` items."""
    inputs = {task.name: {item.input for item in task.items} for task in tasks}
    return [(a, b) for a, b in permutations(tasks, 2) if len(inputs[a.name] & inputs[b.name]) >= min_shared]


def shared_queries(task_a: Task, task_b: Task, limit: int) -> tuple[list[tuple[Item, Item]], int]:
    """(A item, B item) pairs with the same input from A's queries; and how many were ambiguous."""
    b_by_input = {item.input: item for item in task_b.items}
    pairs, ambiguous = [], 0
    for item in query_items(task_a):
        partner = b_by_input.get(item.input)
        if partner is None:
            continue
        if any(is_correct(answer, partner.answers()) for answer in item.answers()):
            ambiguous += 1  # e.g. the same word answers both: nothing to tell apart
            continue
        pairs.append((item, partner))
        if len(pairs) == limit:
            break
    return pairs, ambiguous


def task_conflict(
    handle: ModelHandle,
    task_a: Task,
    task_b: Task,
    vector_b: torch.Tensor,
    layer: int,
    *,
    context: VectorSpec | str = VectorSpec.TEXT_ICL,
    max_items: int = 50,
    prompts: PromptSettings = DEFAULT_PROMPT_SETTINGS,
    max_new_tokens: int = 1,
    metric: str = "prefix",
    examples: int = 3,
) -> ConflictCounts:
    """Counts of A's answer vs B's answer for A-prompted queries, without and with B's vector.

    `vector_b` is [layers, hidden] (B's task vector); it replaces the residual at the query's final
    ':' at `layer`, as in the paper's patching. Answers are `max_new_tokens` greedy tokens scored
    by `metric` ("prefix", "prefix_ignore_case" or "exact"); the defaults are the paper's. `prompts`
    gives A's demonstrations (shots, seed), the template and the batch size; A's prompts are text,
    so its image style does not apply.
    """
    is_correct_by("", [], metric)  # an unknown metric fails here, before any generation
    kind = parse_spec(context)
    if kind not in CONFLICT_CONTEXTS:
        raise ValueError(f"task A is given by text-icl or instruction prompts, not {kind.value!r}")
    pairs, ambiguous = shared_queries(task_a, task_b, max_items)
    queries = [a for a, _ in pairs]
    asked = spec_prompts(task_a, kind, queries, settings=prompts)
    template = as_template(prompts.template)
    plain = generate_answers(handle, asked, max_new_tokens=max_new_tokens, batch_size=prompts.batch_size)
    patched = generate_answers(
        handle,
        asked,
        vector=vector_b[layer],
        layer=layer,
        max_new_tokens=max_new_tokens,
        batch_size=prompts.batch_size,
        marker=template.marker,
    )
    baseline_counts = dict.fromkeys(OUTCOMES, 0)
    patched_counts = dict.fromkeys(OUTCOMES, 0)
    shown: list[ConflictExample] = []
    for (item_a, item_b), before, after in zip(pairs, plain, patched, strict=True):
        baseline_counts[winner(before, item_a.answers(), item_b.answers(), metric)] += 1
        patched_counts[winner(after, item_a.answers(), item_b.answers(), metric)] += 1
        if len(shown) < examples:
            shown.append(ConflictExample(item_a.input, item_a.output, item_b.output, before, after))
    return ConflictCounts(
        task_a=task_a.name,
        task_b=task_b.name,
        context=kind.value,
        layer=layer,
        items=len(pairs),
        baseline=baseline_counts,
        patched=patched_counts,
        ambiguous_skipped=ambiguous,
        examples=shown,
        max_new_tokens=max_new_tokens,
        metric=metric,
    )


@dataclass
class ConflictResults:
    """The `conflict` analysis: one row per ordered pair of tasks sharing inputs and way of giving A."""

    rows: list[ConflictCounts]


@dataclass
class OutcomeTotals:
    baseline: dict[str, int]  # outcome -> count, without the patch
    patched: dict[str, int]  # with B's vector


@dataclass
class ConflictTotals:
    """The `conflict_totals` analysis: outcome counts summed over task pairs, per way of giving A."""

    per_context: dict[str, OutcomeTotals]


def conflict_totals(rows: Sequence[ConflictCounts]) -> ConflictTotals:
    """Outcome counts summed over task pairs, per context."""
    totals: dict[str, OutcomeTotals] = {}
    for row in rows:
        entry = totals.setdefault(
            row.context, OutcomeTotals(dict.fromkeys(OUTCOMES, 0), dict.fromkeys(OUTCOMES, 0))
        )
        for outcome in OUTCOMES:
            entry.baseline[outcome] += row.baseline[outcome]
            entry.patched[outcome] += row.patched[outcome]
    return ConflictTotals(totals)
