"""The typed results of a run, the leaf the report reads: results.json's model and the steps' records.
Imports nothing else of `taskvec.experiments` but its configuration."""
