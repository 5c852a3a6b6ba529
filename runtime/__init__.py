"""Running compiled modules on torch tensors (IREE runtime, DLPack hand-off)."""
