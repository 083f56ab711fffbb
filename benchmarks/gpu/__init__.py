"""GPU validation: gpu_validate.sh (the standing check when a GPU is lent), its report and wheels script."""
