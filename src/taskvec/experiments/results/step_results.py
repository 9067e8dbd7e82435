"""What the run's expensive steps return: typed, cached as JSON (taskvec.typed_json), sent back by
Ray workers, read by the layer choice and the scoring.

`key` is the step's identity, the JSON record its cache key is a digest of (kept beside the result so
a cache entry says what it was made from).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A step's identity: a JSON object of what the step depends on (its cache key is a digest of it).
StepIdentity = dict[str, object]


def _grid_fits(grid: Sequence[Sequence[str]], rows: int, columns: int) -> bool:
    return len(grid) == rows and all(len(row) == columns for row in grid)


@dataclass
class SweepResult:
    """A layer sweep on validation queries: the first token with the vector patched at each layer."""

    key: StepIdentity
    inputs: list[str]
    expected: list[list[str]]
    tokens: list[list[str]]  # [query][layer], at the first of `scales`
    unpatched: list[str]  # [query]: the first token with nothing patched, what a layer must beat
    scales: list[float]  # the scales tried (a residual task vector: [1.0], as it is)
    tokens_per_scale: list[list[list[str]]]  # [scale][query][layer]

    def fits(self, queries: int, layers: int, scales: Sequence[float]) -> bool:
        """Whether this is a whole sweep of `queries` queries over `layers` layers at `scales`."""
        return (
            len(self.inputs) == queries
            and len(self.expected) == queries
            and len(self.unpatched) == queries
            and self.scales == list(scales)
            and len(self.tokens_per_scale) == len(scales)
            and all(_grid_fits(grid, queries, layers) for grid in self.tokens_per_scale)
            and self.tokens == self.tokens_per_scale[0]
        )


@dataclass
class TestAnswers:
    """Greedy answers to the test queries, under the condition's patch if it has one."""

    key: StepIdentity
    inputs: list[str]
    images: list[str | None]  # the query's image file per item (None: a text query)
    prompts: list[str]  # the first two prompts, as examples of what was asked
    expected: list[list[str]]
    generated: list[str]
    first_tokens: list[int]

    def fits(self, queries: int) -> bool:
        """Whether this holds whole answers to `queries` test queries."""
        return all(
            len(values) == queries
            for values in (self.inputs, self.images, self.expected, self.generated, self.first_tokens)
        )
