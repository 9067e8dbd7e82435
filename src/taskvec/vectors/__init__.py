"""Task vectors: extract from examples or instructions, average, save and load with metadata."""

from taskvec.vectors.extract import exemplar_vector, icl_prompts, instruction_vector, sample_demonstrations
from taskvec.vectors.task_vector import TaskVector, load_task_vector, save_task_vector

__all__ = [
    "TaskVector",
    "exemplar_vector",
    "icl_prompts",
    "instruction_vector",
    "load_task_vector",
    "sample_demonstrations",
    "save_task_vector",
]
