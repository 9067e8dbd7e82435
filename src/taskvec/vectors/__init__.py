"""Task vectors: extract from examples or instructions, average, save and load with metadata."""

from taskvec.vectors.extract import (
    Extraction,
    MarkerResiduals,
    TooFewDemonstrationsError,
    exemplar_vector,
    extract_vector,
    icl_prompts,
    instruction_vector,
    last_columns,
    residuals_at_columns,
    residuals_at_marker,
    sample_demonstrations,
)
from taskvec.vectors.spec import EXTRACTABLE_SPECS, VectorSpec, parse_spec
from taskvec.vectors.task_vector import (
    MissingVectorFileError,
    TaskVector,
    VectorFileError,
    check_layers,
    check_vector_fits,
    load_task_vector,
    save_task_vector,
)

__all__ = [
    "EXTRACTABLE_SPECS",
    "Extraction",
    "MarkerResiduals",
    "MissingVectorFileError",
    "TaskVector",
    "TooFewDemonstrationsError",
    "VectorFileError",
    "VectorSpec",
    "check_layers",
    "check_vector_fits",
    "exemplar_vector",
    "extract_vector",
    "icl_prompts",
    "instruction_vector",
    "last_columns",
    "load_task_vector",
    "parse_spec",
    "residuals_at_columns",
    "residuals_at_marker",
    "sample_demonstrations",
    "save_task_vector",
]
