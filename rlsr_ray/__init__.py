"""rlsr_ray: RLSR fine-tuning (GRPO with sentence-embedding rewards) as a Ray-native actor system."""

__version__ = "0.1.0"
