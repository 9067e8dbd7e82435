"""The embedded default LM (Gemma-3-270M from its PyPI package): loading and the paper's core effect.

The first run converts the package's GGUF into the cache (about a minute); later runs load in seconds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from taskvec.engine import sweep_layers
from taskvec.experiments.demo import DemoResult, run_demo
from taskvec.models import ModelHandle, load_model
from taskvec.tasks import load_task
from taskvec.vectors import exemplar_vector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_lm() -> Iterator[ModelHandle]:
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))  # a real model: use every core the machine has
    yield load_model("default")
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo(default_lm: ModelHandle) -> DemoResult:
    return run_demo(default_lm, load_task("country-capital"), progress=False)


def test_default_model_loads_from_its_package(default_lm: ModelHandle) -> None:
    assert default_lm.architecture.model_class == "Gemma3ForCausalLM"
    assert default_lm.num_layers == 18 and default_lm.hidden_size == 640
    inputs = default_lm.build_inputs(["Q:France\nA:Paris\n\nQ:Japan\nA:"])
    with torch.no_grad():
        next_token = default_lm.model(**inputs).logits[0, -1].argmax()
    assert default_lm.tokenizer.decode([int(next_token)]).strip() == "Tokyo"


def test_patched_task_vector_lifts_zero_shot_accuracy(demo: DemoResult) -> None:
    assert demo.test_items == 100
    assert demo.no_context <= 0.05
    assert demo.patched >= 0.25, demo
    # The vector carries most of what the demonstrations give (measured: 0.38 patched vs 0.40 ICL).
    assert demo.patched >= 0.75 * demo.in_context, demo
    assert 4 <= demo.best_layer <= 13, "task vectors live mid-depth"


def test_one_pass_sweep_equals_the_naive_loop_on_the_real_model(default_lm: ModelHandle) -> None:
    vector = exemplar_vector(default_lm, load_task("country-capital"), shots=5)
    inputs = default_lm.build_inputs(["Q:Germany\nA:"])
    naive = sweep_layers(default_lm, inputs, vector.vectors, method="naive")
    one_pass = sweep_layers(default_lm, inputs, vector.vectors, method="one_pass")
    torch.testing.assert_close(one_pass, naive, atol=2e-3, rtol=1e-3)
    assert torch.equal(one_pass.argmax(-1), naive.argmax(-1))
