"""Compiling: the target table, the stage pipeline, the IREE driver and the module cache."""
