"""Evaluation: held-out answers scored by text metrics and a pairwise judge, and the SFT / RLSR /
SFT+RLSR comparison with its report."""
