"""Run configs (YAML) that ship with SIFT-Train; see engine/resources.py."""
