"""Layer workers: the per-stage training logic (stage.py) and the process around it (worker.py)."""
