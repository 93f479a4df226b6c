"""Run folders: atomic writes, checkpoints, metrics logs, checks of files and folders from outside."""
