"""Accelerate-driven training: config, schedules, checkpoints, logging, evaluation."""
# This folder is installed as lmim.train (pyproject.toml); a bare `import train` would load a second copy
# of every module (or a user's own train/ folder), so it is refused.
if __name__ != "lmim.train":
    raise ImportError(f"import lmim.train, not {__name__}: lmim's packages live under the lmim namespace.")
