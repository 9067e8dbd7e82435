"""Protocols of the paper: evaluation, layer choice, baselines, xPatch, LLM -> VLM, ensembling.

from taskvec.experiments import RunConfig, run_experiments
results = run_experiments(load_model("default-vlm"), RunConfig.quick_preset(), "taskvec-run",
                          llm=load_model("default"))
"""

from taskvec.experiments.conditions import Condition, plan_conditions
from taskvec.experiments.config import METRICS, RunConfig
from taskvec.experiments.layer_choice import choose_layer
from taskvec.experiments.paper_numbers import paper_numbers
from taskvec.experiments.runner import run_analyses_and_report, run_experiments
from taskvec.experiments.tables import format_tables

__all__ = [
    "METRICS",
    "Condition",
    "RunConfig",
    "choose_layer",
    "format_tables",
    "paper_numbers",
    "plan_conditions",
    "run_analyses_and_report",
    "run_experiments",
]
