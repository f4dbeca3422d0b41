"""Evaluation: nine scenarios, robustness tasks, baselines, ranking metrics, `ecsearch eval`."""
