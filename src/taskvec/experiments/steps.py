"""The run's expensive steps for one (condition, task, seed): its vector, its sweep, its test answers.

Each step is cached (see caching.py) under a key made of what it depends on, so the runner can ask
for any step in any order and a rerun only computes what is missing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from taskvec.caching import StepCache, digest, task_fingerprint
from taskvec.engine import logit_lens
from taskvec.evaluation import generate_answers, sweep_first_tokens
from taskvec.experiments.conditions import Condition
from taskvec.experiments.config import RunConfig
from taskvec.experiments.vector_store import VectorStore, ensemble_of, exemplar_subset_vector
from taskvec.models import ModelHandle
from taskvec.prompts import DEFAULT_TEMPLATE, Prompt, build_icl_prompt
from taskvec.tasks import Item, Task
from taskvec.vectors import VectorSpec, sample_demonstrations

TEMPLATE_KEY = [DEFAULT_TEMPLATE.query, DEFAULT_TEMPLATE.answer, DEFAULT_TEMPLATE.marker]


@dataclass
class StepRunner:
    handle: ModelHandle
    llm: ModelHandle | None
    config: RunConfig
    cache: StepCache
    store: VectorStore
    progress: bool = True

    # ---- vectors -------------------------------------------------------------------------------
    def vector_for(
        self, condition: Condition, task: Task, seed: int | None
    ) -> tuple[torch.Tensor, str] | None:
        """[layers, hidden] and its key, or None for an unpatched condition."""
        spec, run_seed = condition.vector, seed or 0
        if spec is None:
            return None
        if spec.extractable:
            vector, key = self.store.get("vlm", self.handle, task, spec, run_seed)
            return vector.vectors, key
        if spec is VectorSpec.LLM_TEXT_ICL:
            if self.llm is None:
                raise ValueError(f"condition {condition.name} patches base-LM vectors: no base LM given")
            vector, key = self.store.get("llm", self.llm, task, VectorSpec.TEXT_ICL, run_seed)
            return vector.vectors, key
        examples = condition.examples or 0
        per_prompt = self.store.per_prompt("vlm", self.handle, task, VectorSpec.TEXT_ICL, run_seed)
        _, text_key = self.store.get("vlm", self.handle, task, VectorSpec.TEXT_ICL, run_seed)
        exemplar = exemplar_subset_vector(per_prompt, examples, self.config.shots, run_seed)
        subset_key = digest({"exemplar_of": text_key, "examples": examples, "seed": run_seed})
        if spec is VectorSpec.EXEMPLAR_SUBSET:
            return exemplar, subset_key
        if spec is not VectorSpec.ENSEMBLE:
            raise ValueError(f"condition {condition.name}: no rule to make a {spec.value} vector")
        instruction, instruction_key = self.store.get("vlm", self.handle, task, VectorSpec.INSTRUCTION)
        return ensemble_of(exemplar, instruction.vectors), digest([subset_key, instruction_key])

    def vector_token(self, condition: Condition, task: Task, seed: int | None, layer: int) -> int | None:
        """The token the patched vector decodes to by itself (final norm + unembedding), or None."""
        vector = self.vector_for(condition, task, seed)
        if vector is None:
            return None
        return int(logit_lens(self.handle, vector[0][layer]).argmax())

    # ---- prompts -------------------------------------------------------------------------------
    def prompts(self, condition: Condition, task: Task, items: list[Item], seed: int | None) -> list[Prompt]:
        style = self.config.style_for(task.name)
        rng = random.Random(seed or 0)
        prompts = []
        for item in items:
            demos = []
            if condition.demos is not None:
                demos = sample_demonstrations(task.split("val"), item, self.config.shots, rng)
            prompt = build_icl_prompt(
                demos,
                item,
                demo_modality=condition.demos or "text",
                query_modality=condition.query,
                style=style,
            )
            if condition.instruction_prompt:
                prompt = Prompt(f"{task.instruction}\n{prompt.text}", prompt.images)
            prompts.append(prompt)
        return prompts

    def _prompt_identity(self, condition: Condition, task: Task, seed: int | None) -> dict[str, Any]:
        uses_images = condition.query == "image" or condition.demos == "image"
        return {
            "model": self.store.fingerprint(self.handle),
            "task": task_fingerprint(task),
            "query": condition.query,
            "demos": condition.demos,
            "shots": self.config.shots if condition.demos else None,
            "seed": seed if condition.demos else None,
            "instruction": task.instruction if condition.instruction_prompt else None,
            "style": self.config.style_for(task.name) if uses_images else None,
            "template": TEMPLATE_KEY,
        }

    # ---- layer sweep on validation -------------------------------------------------------------
    def sweep(self, condition: Condition, task: Task, seed: int | None) -> dict[str, Any]:
        """First tokens per validation query and layer, with the condition's vector patched."""
        vector = self.vector_for(condition, task, seed)
        if vector is None:
            raise ValueError(f"condition {condition.name} patches nothing: no sweep")
        items = task.split("val")[: self.config.val_limit]
        identity = {
            "step": "sweep",
            **self._prompt_identity(condition, task, seed),
            "vector": vector[1],
            "val_limit": self.config.val_limit,
        }
        key = self.cache.key(identity)
        cached = self.cache.load("sweeps", task.name, key)
        if cached is not None:
            return cached
        label = f"sweep {condition.name} {task.name}" if self.progress else None
        tokens = sweep_first_tokens(
            self.handle, self.prompts(condition, task, items, seed), vector[0], progress=label
        )
        result = {
            "key": identity,
            "inputs": [item.input for item in items],
            "expected": [list(item.answers()) for item in items],
            "tokens": tokens,
        }
        self.cache.store("sweeps", task.name, key, result)
        return result

    # ---- test generations ----------------------------------------------------------------------
    def test(self, condition: Condition, task: Task, seed: int | None, layer: int | None) -> dict[str, Any]:
        """Greedy answers to the test queries (under the patch at `layer` if the condition patches)."""
        vector = self.vector_for(condition, task, seed)
        items = task.split("test")[: self.config.test_limit]
        identity = {
            "step": "test",
            **self._prompt_identity(condition, task, seed),
            "vector": vector[1] if vector is not None else None,
            "layer": layer if vector is not None else None,
            "test_limit": self.config.test_limit,
            "max_new_tokens": self.config.max_new_tokens,
        }
        key = self.cache.key(identity)
        cached = self.cache.load("test", task.name, key)
        if cached is not None and "first_tokens" in cached:
            return cached
        prompts = self.prompts(condition, task, items, seed)
        label = f"test {condition.name} {task.name}" if self.progress else None
        first_tokens: list[int] = []
        generated = generate_answers(
            self.handle,
            prompts,
            vector=vector[0][layer] if vector is not None and layer is not None else None,
            layer=layer if vector is not None else None,
            max_new_tokens=self.config.max_new_tokens,
            batch_size=self.config.batch_size if condition.demos else self.config.query_batch_size,
            progress=label,
            first_tokens=first_tokens,
        )
        style = self.config.style_for(task.name)
        result = {
            "key": identity,
            "inputs": [item.input for item in items],
            "images": [str(item.image(style)) if condition.query == "image" else None for item in items],
            "prompts": [prompt.text for prompt in prompts[:2]],
            "expected": [list(item.answers()) for item in items],
            "generated": generated,
            "first_tokens": first_tokens,
        }
        self.cache.store("test", task.name, key, result)
        return result
