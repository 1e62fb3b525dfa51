"""Data-free methods over one tensor at a time (RTN, NF4/FP4) and their streaming pipeline."""
