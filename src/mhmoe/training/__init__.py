"""Training: the run configuration, schedules, the loop, whole runs, presets and the paper reproduction."""
