"""Tasks: one file each, a dataclass of settings plus sample construction and metrics."""
