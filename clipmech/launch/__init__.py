"""Units of work (a training run, an analysis unit) turned into processes: in this process, through
torchrun, or as submitit jobs on SLURM. Units are idempotent (content-hashed output folders with a
`done` marker), so any launcher can retry them and a rerun only does what is unfinished."""
from clipmech.launch.units import Unit, run_unit, unit_result
from clipmech.launch.launcher import LaunchOptions, run_units

__all__ = ["Unit", "run_unit", "unit_result", "LaunchOptions", "run_units"]
