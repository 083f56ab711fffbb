"""Model adapters: single-device code for the full loss and the early-exit prefix."""
