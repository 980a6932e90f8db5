"""The RLSR driver: the Ray session, the pools, the loop and one step of it, held-out scoring."""
