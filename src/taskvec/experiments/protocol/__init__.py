"""The paper's protocol as data: conditions and their vector recipes, model-free floors, the tables
and the paper's own numbers. Imports nothing of the execution; the results model only."""
