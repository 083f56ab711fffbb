"""Entry points: the `sift` command, the training script for launchers, and cluster helpers."""
