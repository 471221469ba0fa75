"""Optuna tuning of the planner's heuristic values (`medimgen tune`)."""
