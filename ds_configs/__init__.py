"""DeepSpeed JSON configs that ship with SIFT-Train; see engine/resources.py."""
