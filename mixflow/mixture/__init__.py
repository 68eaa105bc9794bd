"""Data-mixture policies and the exact domain schedule: pure numpy/torch, no Ray."""
