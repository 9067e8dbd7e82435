"""RunConfig: every choice of the reproduction, with the paper's as default.

One frozen dataclass so a run's configuration can be written into results.json as is, and so each
cached step can name exactly the options that shaped its result (see `caching.step_key`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from taskvec.byte_sizes import format_byte_size, parse_byte_size
from taskvec.engine.sweep_memory import SWEEP_MEMORY_HELP
from taskvec.function_vectors.settings import FunctionVectorSettings
from taskvec.layer_choice import DEFAULT_FIRST_CANDIDATE_LAYER, DEFAULT_LAST_CANDIDATE_LAYER
from taskvec.options import nested, option
from taskvec.prompts import TEMPLATE_NAMES
from taskvec.prompts.settings import PromptSettings
from taskvec.tasks import PAPER_TASKS, STRICT_HELP

MetricName = Literal["prefix", "prefix_ignore_case", "exact"]
METRICS: tuple[MetricName, ...] = ("prefix", "prefix_ignore_case", "exact")

# Two families (flags, animals), about 2 minutes. No food task: food-flavor's majority answer
# ("sweet", 0.64 of its test split) would pass any smoke check without a working task vector.
QUICK_TASKS = ("country-capital", "animal-latin")


def _seed_count(text: str) -> tuple[int, ...]:
    """`--seeds N`: seeds 0..N-1."""
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"expected a number of seeds (at least 1), got {text!r}")
    return tuple(range(int(text)))


def _seed_count_text(seeds: tuple[int, ...]) -> list[str]:
    if seeds != tuple(range(len(seeds))):
        raise ValueError(f"seeds {seeds} are not 0..N-1, the only seeds --seeds N can give")
    return [str(len(seeds))]


def _byte_size_text(size: int) -> list[str]:
    return [format_byte_size(size)]


def _style_entry(text: str) -> tuple[str, str]:
    """`--style country=twemoji` -> ("country", "twemoji")."""
    name, separator, style = text.partition("=")
    if not separator or not name or not style:
        raise ValueError(f"expected TASK_OR_FAMILY=STYLE (e.g. country=twemoji), got {text!r}")
    return name, style


def _style_entries(styles: dict[str, str]) -> list[str]:
    return [f"{name}={style}" for name, style in styles.items()]


@dataclass(frozen=True)
class RunConfig:
    """Options of `run_experiments`; defaults follow the paper's reference code.

    Each field is also a `taskvec run` option (see `taskvec.options`): its flag and help are declared
    here, next to its default.
    """

    tasks: tuple[str, ...] = option(PAPER_TASKS, "built-in task names or task files", metavar="TASK")
    strict: bool = option(False, STRICT_HELP)
    seeds: tuple[int, ...] = option(
        (0, 1, 2),
        "number of seeds, 0..N-1; each seed resamples the demonstrations",
        parse=_seed_count,
        show=_seed_count_text,
        metavar="N",
    )
    # Demonstrations per prompt, the template and the batch size of prompts with demonstrations; the
    # seed and image style are the run's per step (`seeds`, `styles`).
    prompts: PromptSettings = nested(PromptSettings(), only=("shots", "template", "batch_size"))
    val_limit: int | None = option(
        None, "validation queries used to build exemplar vectors and to choose layers", none_word="all"
    )
    test_limit: int | None = option(
        None, "test queries per task ('all': the whole test split, 26-100 items per task)", none_word="all"
    )
    max_new_tokens: int = option(
        1,
        "tokens generated per answer; the paper's protocol generates one (its reference "
        "configs/base.yaml), and the prefix metric reads the first token anyway",
    )
    # 1-2 dozen tokens per bare prompt, so a batch of 8 leaves the per-forward overhead dominant
    # (measured in bench/NOTES.md).
    query_batch_size: int = option(
        32, "prompts per generation batch for a bare query (no context, patched, instruction)"
    )
    quick: bool = option(
        False, "2 tasks, 1 seed, few items: a smoke run in minutes on CPU (options given with it win)"
    )
    layer_choice: Literal["validation"] | int = option(
        "validation",
        "patch this layer in every condition, or 'validation': one full layer sweep per patched "
        "condition on validation, as the paper",
        flag="--layer",
        metavar="L",
    )
    first_candidate_layer: int = option(
        DEFAULT_FIRST_CANDIDATE_LAYER,
        "lowest layer the validation layer choice may pick (negative counts from the top, as in Python)",
        metavar="L",
    )
    last_candidate_layer: int = option(
        DEFAULT_LAST_CANDIDATE_LAYER,
        "highest layer the validation layer choice may pick, inclusive (negative counts from the top: "
        "-1 is the last layer). The default stops before the last layer: replacing the last layer's "
        "output at the last position leaves only the final norm and unembedding, so the answer cannot "
        "depend on the query",
        metavar="L",
    )
    ensemble_examples: tuple[int, ...] = option(
        (0, 5, 10, 15, 20, 25, 30),
        "examples per exemplar vector on the ensemble curve, multiples of --shots; 0 = instruction "
        "alone / no vector",
        metavar="N",
    )
    # The best layer is a property of the model and task, not of which demonstrations were sampled;
    # sweeping every seed triples the run's largest cost (measured: 22 of ~40 minutes on the default
    # VLM) for the same choice.
    layer_sweep_seeds: int | None = option(
        1,
        "how many seeds' vectors the validation layer sweeps use (N or 'all'); the best layer depends "
        "on the model and task, not on the sampled demonstrations",
        flag="--sweep-seeds",
        metavar="N",
        none_word="all",
    )
    # Moves the logits by rounding alone (bench/NOTES.md), so a cached sweep made under another budget
    # still stands.
    sweep_memory: int | None = option(
        None,
        SWEEP_MEMORY_HELP,
        parse=parse_byte_size,
        show=_byte_size_text,
        metavar="BYTES",
    )
    # A vector of fewer examples estimates the same mean, so its best layer is the same; the curve's
    # sweeps would otherwise be ~70% of a run's time.
    ensemble_layer_from: Literal["largest", "each"] = option(
        "largest",
        "layer choice on the ensemble curve: 'largest' sweeps only the largest n of each kind "
        "(exemplar, ensemble) and uses its layer for every n; 'each' sweeps every point",
        flag="--ensemble-layer",
    )
    ensemble_ignore_case: bool = option(
        True, "score the ensemble curve ignoring case, as the reference's ensembling runs"
    )
    styles: dict[str, str] | None = option(
        None,
        "image style per task or per task family (country, animal, food), repeatable "
        "(default: each task's first style)",
        flag="--style",
        parse=_style_entry,
        show=_style_entries,
        collect=dict,
        metavar="TASK_OR_FAMILY=STYLE",
    )
    metric: MetricName = option("prefix", "metric of the tables and of layer choice (all are stored)")
    examples_per_condition: int = option(2, "example generations kept in results.json per condition")
    bootstrap_samples: int = option(
        1000, "bootstrap resamples of the test items for the 95% intervals (at least 100)"
    )
    query_independent_share: float = option(
        0.9,
        "a patched condition whose answers equal the vector's own decoded answer at least this often "
        "is treated as not depending on the query; in (0, 1]",
    )
    function_vectors: bool = option(
        True,
        "function-vector conditions beside the residual ones: attention heads scored by causal "
        "indirect effect, the top heads' mean outputs added at a layer and scale chosen on validation",
    )
    # Todd et al.'s protocol: 10-shot prompts, means over 100, effects on 25, the top 10 heads.
    function_vector: FunctionVectorSettings = nested(FunctionVectorSettings(), prefix="fv-")
    # Each seed's function vector is its own 100 + 25 in-context prompts per demonstration kind,
    # several times a residual vector's cost (bench/NOTES.md).
    fv_seeds: int | None = option(
        1,
        "how many of the run's seeds get a function vector of their own (N or 'all'); "
        "function-vector conditions are tested on those seeds",
        metavar="N",
        none_word="all",
    )

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("no tasks to run")
        if not self.seeds:
            raise ValueError("no seeds to run")
        if self.prompts.shots < 1:
            raise ValueError(f"shots must be at least 1, got {self.prompts.shots}")
        if self.prompts.template not in TEMPLATE_NAMES:
            raise ValueError(
                f"unknown template {self.prompts.template!r}; use one of {', '.join(TEMPLATE_NAMES)}"
            )
        if self.max_new_tokens < 1 or self.prompts.batch_size < 1 or self.query_batch_size < 1:
            raise ValueError("max_new_tokens, batch_size and query_batch_size must be at least 1")
        for limit, name in ((self.val_limit, "val_limit"), (self.test_limit, "test_limit")):
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be at least 1, got {limit}")
        if isinstance(self.layer_choice, str) and self.layer_choice != "validation":
            raise ValueError(f"layer_choice is 'validation' or a layer index, got {self.layer_choice!r}")
        first, last = self.first_candidate_layer, self.last_candidate_layer
        # Without the model's depth only same-sign bounds compare (0 and -2 may or may not overlap).
        if (first >= 0) == (last >= 0) and first > last:
            raise ValueError(
                f"no candidate layers: first_candidate_layer {first} is above last_candidate_layer {last}"
            )
        for count in self.ensemble_examples:
            if count < 0 or count % self.prompts.shots:
                raise ValueError(
                    f"ensemble example counts must be multiples of shots={self.prompts.shots} (each "
                    f"exemplar vector is the mean of whole {self.prompts.shots}-shot prompts), got {count}"
                )
        if self.layer_sweep_seeds is not None and self.layer_sweep_seeds < 1:
            raise ValueError(f"layer_sweep_seeds must be at least 1 or None, got {self.layer_sweep_seeds}")
        if self.ensemble_layer_from not in ("largest", "each"):
            raise ValueError(f"ensemble_layer_from is 'largest' or 'each', got {self.ensemble_layer_from!r}")
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")
        if self.examples_per_condition < 0:
            raise ValueError(f"examples_per_condition must be at least 0, got {self.examples_per_condition}")
        if self.bootstrap_samples < 100:
            raise ValueError(
                f"bootstrap_samples must be at least 100 for a 95% interval, got {self.bootstrap_samples}"
            )
        if not 0 < self.query_independent_share <= 1:
            raise ValueError(f"query_independent_share must be in (0, 1], got {self.query_independent_share}")
        fv = self.function_vector
        for count, name in (
            (fv.shots, "fv_shots"),
            (fv.mean_prompts, "fv_mean_prompts"),
            (fv.effect_prompts, "fv_effect_prompts"),
            (fv.heads, "fv_heads"),
        ):
            if count < 1:
                raise ValueError(f"{name} must be at least 1, got {count}")
        if self.fv_seeds is not None and self.fv_seeds < 1:
            raise ValueError(f"fv_seeds must be at least 1 or None, got {self.fv_seeds}")
        if not self.function_vector.scales or any(scale <= 0 for scale in self.function_vector.scales):
            raise ValueError(
                f"fv_scales must be one or more positive numbers, got {self.function_vector.scales}"
            )
        if len(set(self.function_vector.scales)) != len(self.function_vector.scales):
            raise ValueError(f"fv_scales repeat a value: {self.function_vector.scales}")
        if self.sweep_memory is not None and self.sweep_memory < 1:
            raise ValueError(
                f"sweep_memory must be at least 1 byte (any budget below one copy of the cache decodes "
                f"one layer at a time), got {self.sweep_memory}"
            )

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
            # Enough prompts to rank the heads roughly; the full protocol is the default.
            "function_vector": FunctionVectorSettings(
                shots=5, mean_prompts=16, effect_prompts=6, scales=(1.0, 4.0)
            ),
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
