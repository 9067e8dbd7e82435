"""How a run executes: its cached steps, the vector store, the local and Ray executors, the runner."""
