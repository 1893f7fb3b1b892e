"""Optimized step schedules for any ODE sampler: GITS-style search and AYS-style optimization.

- :mod:`~fastsample.schedule_search.trajectories`: teacher ODE trajectories on a fine candidate grid.
- :mod:`~fastsample.schedule_search.gits`: one-step cost matrix, least-cost K-step path (DP) and a
  refinement with the real (multistep) solver.
- :mod:`~fastsample.schedule_search.ays`: gradient descent on log-sigmas through the sampler.
- :mod:`~fastsample.schedule_search.quality`: the same on a sample-quality objective (KID to real data).
- :mod:`~fastsample.jobs.schedule_search`: ``python sample.py mode=optimize_schedule`` (writes a
  schedule file that ``sampler.schedule.kind=file`` loads).
"""

from fastsample.schedule_search.ays import LogSigmaSchedule, ays_search
from fastsample.schedule_search.gits import best_path, gits_search, refine_path, step_costs
from fastsample.schedule_search.quality import QualityObjective, quality_search
from fastsample.schedule_search.trajectories import (
    Trajectories,
    candidate_sigmas,
    final_rms,
    steps_for_nfe,
    teacher_trajectories,
)

__all__ = [
    "LogSigmaSchedule",
    "QualityObjective",
    "Trajectories",
    "ays_search",
    "best_path",
    "candidate_sigmas",
    "final_rms",
    "gits_search",
    "quality_search",
    "refine_path",
    "step_costs",
    "steps_for_nfe",
    "teacher_trajectories",
]
