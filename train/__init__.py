"""Accelerate-driven training: config, schedules, checkpoints, logging, evaluation."""
