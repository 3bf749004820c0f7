"""Compute-node side of PruneTune: one recipe per stage, imported inside the job."""
