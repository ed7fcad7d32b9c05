"""Small helpers shared by several steps (tensors, files, processes)."""
