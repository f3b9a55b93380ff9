"""Shard building, verification, export and benchmark entry points."""
# This folder is installed as lmim.tools (pyproject.toml); a bare `import tools` would load a second copy
# of every module (or a user's own tools/ folder), so it is refused.
if __name__ != "lmim.tools":
    raise ImportError(f"import lmim.tools, not {__name__}: lmim's packages live under the lmim namespace.")
