"""DALI decoding; the device (CPU / GPU "mixed") is chosen at construction time."""
