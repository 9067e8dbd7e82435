"""Function vectors (Todd et al. 2024): attention heads that carry a task, found by their causal
indirect effect, and the sum of their mean outputs as a vector that triggers the task."""

from taskvec.function_vectors.across_modalities import ModalityComparison, Transfer, compare_modalities
from taskvec.function_vectors.indirect_effect import EffectMethod, IndirectEffects, indirect_effects
from taskvec.function_vectors.means import mean_head_activations
from taskvec.function_vectors.prompts import cycled_queries, function_prompts
from taskvec.function_vectors.protocol import find_function_vector
from taskvec.function_vectors.settings import (
    DEFAULT_EFFECT_PROMPTS,
    DEFAULT_MEAN_PROMPTS,
    DEFAULT_SHOTS,
    DEFAULT_TOP_HEADS,
    FunctionVectorSettings,
)
from taskvec.function_vectors.vector import FunctionVector, Head, function_vector, top_heads

__all__ = [
    "DEFAULT_EFFECT_PROMPTS",
    "DEFAULT_MEAN_PROMPTS",
    "DEFAULT_SHOTS",
    "DEFAULT_TOP_HEADS",
    "EffectMethod",
    "FunctionVector",
    "FunctionVectorSettings",
    "Head",
    "IndirectEffects",
    "ModalityComparison",
    "Transfer",
    "compare_modalities",
    "cycled_queries",
    "find_function_vector",
    "function_prompts",
    "function_vector",
    "indirect_effects",
    "mean_head_activations",
    "top_heads",
]
