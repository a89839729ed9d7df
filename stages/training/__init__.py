"""Training shared by the model stages: the sample tables and batches, the C2-CRS and generator training loops,
checkpoints that make a killed run resumable."""
