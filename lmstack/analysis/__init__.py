"""Analysis of trained models: scaling laws (`scaling`) and the local learning coefficient (`llc`)."""
