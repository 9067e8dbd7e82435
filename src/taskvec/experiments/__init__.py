"""Protocols of the paper: conditions and their vector recipes, layer choice, floors, xPatch,
LLM -> VLM, ensembling; typed results.

from taskvec.experiments import RunConfig, run_experiments
results = run_experiments(load_model("default-vlm"), RunConfig.quick_preset(), "taskvec-run",
                          llm=load_model("default"))
print(results.table("paper").column("text-icl-xpatch").summary.interval)

The package is split by what each part is: `protocol` (conditions, recipes, floors, tables, scoring),
`execution` (steps, the vector store, the local and Ray executors, the runner) and `results` (the
typed results the report reads, a leaf).
"""

from taskvec.experiments.config import METRICS, RunConfig
from taskvec.experiments.execution.run_analyses import run_analyses_of_run
from taskvec.experiments.execution.runner import run_experiments
from taskvec.experiments.protocol.conditions import (
    PAPER_CONDITIONS,
    Condition,
    TableSlot,
    paper_conditions,
    plan_conditions,
    with_condition,
)
from taskvec.experiments.protocol.paper_numbers import paper_numbers
from taskvec.experiments.protocol.recipes import MadeVector, Needs, RecipeContext, VectorRecipe
from taskvec.experiments.protocol.tables import format_tables
from taskvec.experiments.results.run_results import RunResults
from taskvec.layer_choice import choose_layer

__all__ = [
    "METRICS",
    "PAPER_CONDITIONS",
    "Condition",
    "MadeVector",
    "Needs",
    "RecipeContext",
    "RunConfig",
    "RunResults",
    "TableSlot",
    "VectorRecipe",
    "choose_layer",
    "format_tables",
    "paper_conditions",
    "paper_numbers",
    "plan_conditions",
    "run_analyses_of_run",
    "run_experiments",
    "with_condition",
]
