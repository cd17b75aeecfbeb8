"""Training engine: an iteration-based loop with hooks, checkpoints, schedules and process-group helpers."""
