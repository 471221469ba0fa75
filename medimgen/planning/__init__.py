"""nnU-Net plans -> generation config (heuristics) and GPU-memory fitting."""

from medimgen.planning.api import PlanResult, plan_dataset

__all__ = ["PlanResult", "plan_dataset"]
