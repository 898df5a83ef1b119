"""stride's inference core: schedules, parameterisations, grids, coefficient tables, the executor."""
from .analytic import GaussianMixture
from .builders import SOLVERS, build, make_table, theoretical_order
from .contracts import Denoiser
from .executor import StepOutput, Stepper, sample, seeded_noise
from .grids import make_grid
from .param import PARAMS, convert
from .schedules import EDMSchedule, FlowSchedule, Schedule, VPLinearSchedule, VPSchedule, schedule_from_json
from .table import Table

__all__ = [
    "PARAMS",
    "SOLVERS",
    "Denoiser",
    "EDMSchedule",
    "FlowSchedule",
    "GaussianMixture",
    "Schedule",
    "StepOutput",
    "Stepper",
    "Table",
    "VPLinearSchedule",
    "VPSchedule",
    "build",
    "convert",
    "make_grid",
    "make_table",
    "sample",
    "schedule_from_json",
    "seeded_noise",
    "theoretical_order",
]
