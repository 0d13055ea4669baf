"""The training loop and its components: stages (plug-ins), optimiser and schedule, checkpoints,
pre-emption, metrics."""
