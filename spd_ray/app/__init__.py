"""The viewer: a FastAPI app over a run, its analyses and per-prompt computations."""
