"""Protocols of the paper: conditions, layer choice, floors, xPatch, LLM -> VLM, ensembling; typed results.

from taskvec.experiments import RunConfig, run_experiments
results = run_experiments(load_model("default-vlm"), RunConfig.quick_preset(), "taskvec-run",
                          llm=load_model("default"))
print(results.table("paper").column("text-icl-xpatch").summary.interval)
"""

from taskvec.experiments.config import METRICS, RunConfig
from taskvec.experiments.execution.run_analyses import run_analyses_of_run
from taskvec.experiments.execution.runner import run_experiments
from taskvec.experiments.protocol.conditions import (
    CONDITIONS,
    Condition,
    TableSlot,
    plan_conditions,
    register_condition,
    unregister_condition,
)
from taskvec.experiments.protocol.paper_numbers import paper_numbers
from taskvec.experiments.protocol.tables import format_tables
from taskvec.experiments.results.run_results import RunResults
from taskvec.layer_choice import choose_layer

__all__ = [
    "CONDITIONS",
    "METRICS",
    "Condition",
    "RunConfig",
    "RunResults",
    "TableSlot",
    "choose_layer",
    "format_tables",
    "paper_numbers",
    "plan_conditions",
    "register_condition",
    "run_analyses_of_run",
    "run_experiments",
    "unregister_condition",
]
