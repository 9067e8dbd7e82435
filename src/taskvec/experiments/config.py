"""RunConfig: every choice of the reproduction, with the paper's as default.

One frozen dataclass so a run's configuration can be written into results.json as is, and so each
cached step can name exactly the options that shaped its result (see `caching.step_key`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from taskvec.tasks import PAPER_TASKS

MetricName = Literal["prefix", "prefix_ignore_case", "exact"]
METRICS: tuple[MetricName, ...] = ("prefix", "prefix_ignore_case", "exact")

# Two families (flags, animals), about 2 minutes. No food task: food-flavor's majority answer
# ("sweet", 0.64 of its test split) would pass any smoke check without a working task vector.
QUICK_TASKS = ("country-capital", "animal-latin")


@dataclass(frozen=True)
class RunConfig:
    """Options of `run_experiments`; defaults follow the paper's reference code."""

    tasks: tuple[str, ...] = PAPER_TASKS  # built-in names or task files
    seeds: tuple[int, ...] = (0, 1, 2)  # each seed resamples the demonstrations
    shots: int = 5  # demonstrations per prompt, for vectors and in-context baselines
    # Validation queries used to build exemplar vectors and to choose layers (None: all 30).
    val_limit: int | None = None
    test_limit: int | None = None  # None: the whole test split (26-100 items per task)
    # The reference generates one token (configs/base.yaml); the prefix metric is first-token anyway.
    max_new_tokens: int = 1
    batch_size: int = 8  # prompts per generation batch when they carry demonstrations
    # Prompts per batch for a bare query (no context, patched, instruction): 1-2 dozen tokens each,
    # so a batch of 8 leaves the per-forward overhead dominant (measured in bench/NOTES.md).
    query_batch_size: int = 32
    quick: bool = False
    # "validation": one full layer sweep per patched condition on validation (paper); or a fixed layer.
    layer_choice: Literal["validation"] | int = "validation"
    # Examples per exemplar vector on the ensemble curve; 0 = instruction alone / no vector.
    ensemble_examples: tuple[int, ...] = (0, 5, 10, 15, 20, 25, 30)
    # Seeds whose vectors the validation sweeps use (None: all). The best layer is a property of the
    # model and task, not of which demonstrations were sampled; sweeping every seed triples the
    # run's largest cost (measured: 22 of ~40 minutes on the default VLM) for the same choice.
    layer_sweep_seeds: int | None = 1
    # Layer choice on the ensemble curve: "largest" sweeps only the largest n of each kind (exemplar,
    # ensemble) and uses its layer for every n (a vector of fewer examples estimates the same mean,
    # so its best layer is the same; the curve's sweeps would otherwise be ~70% of a run's time);
    # "each" sweeps every point.
    ensemble_layer_from: Literal["largest", "each"] = "largest"
    # The reference scores its ensembling runs with allow_lower_case=true.
    ensemble_ignore_case: bool = True
    # Image style per task or per task family ("country", "animal", "food"); None: each task's first.
    styles: dict[str, str] | None = None
    # Metric of the tables and of layer choice (all three are stored per result).
    metric: MetricName = "prefix"
    examples_per_condition: int = 2  # example generations kept in results.json

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("no tasks to run")
        if not self.seeds:
            raise ValueError("no seeds to run")
        if self.shots < 1:
            raise ValueError(f"shots must be at least 1, got {self.shots}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.query_batch_size < 1:
            raise ValueError("max_new_tokens, batch_size and query_batch_size must be at least 1")
        for limit, name in ((self.val_limit, "val_limit"), (self.test_limit, "test_limit")):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1, got {limit}")
        if isinstance(self.layer_choice, str) and self.layer_choice != "validation":
            raise ValueError(f"layer_choice is 'validation' or a layer index, got {self.layer_choice!r}")
        for count in self.ensemble_examples:
            if count < 0 or count % self.shots:
                raise ValueError(
                    f"ensemble example counts must be multiples of shots={self.shots} "
                    f"(each exemplar vector is the mean of whole {self.shots}-shot prompts), got {count}"
                )
        if self.layer_sweep_seeds is not None and self.layer_sweep_seeds < 1:
            raise ValueError(f"layer_sweep_seeds must be at least 1 or None, got {self.layer_sweep_seeds}")
        if self.ensemble_layer_from not in ("largest", "each"):
            raise ValueError(f"ensemble_layer_from is 'largest' or 'each', got {self.ensemble_layer_from!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> RunConfig:
        """Two tasks, one seed, few items: a smoke run of every condition in a few minutes on CPU."""
        preset: dict[str, Any] = {
            "tasks": QUICK_TASKS,
            "seeds": (0,),
            # Sweeps dominate (about 0.5-0.8 s per image query on the default VLM, one thread):
            # 8 queries x 10 distinct patched conditions x 2 tasks keeps them near two minutes.
            "val_limit": 8,
            "test_limit": 15,
            "ensemble_examples": (0, 5, 30),
            "quick": True,
        }
        preset.update(overrides)
        return cls(**preset)

    def with_options(self, **changes: Any) -> RunConfig:
        return replace(self, **changes)

    def style_for(self, task_name: str) -> str | None:
        """The task's own entry, else its family's (the part of the name before the first '-')."""
        if not self.styles:
            return None
        return self.styles.get(task_name, self.styles.get(task_name.split("-")[0]))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data
