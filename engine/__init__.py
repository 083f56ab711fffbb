"""The training library: everything between a batch and an optimizer step."""
