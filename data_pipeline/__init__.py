"""Text -> tokenizer -> packed instances -> Arrow shards; reader, sampler, masking collator, loader.

This package never imports `engine`: it hands the engine plain dicts of tensors (see `batch.py`).
"""
