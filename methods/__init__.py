"""KV-cache methods: one file each, a dataclass of hyper-parameters plus its cache layer."""
