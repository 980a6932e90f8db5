"""`python -m rlsr_ray.compare`: see rlsr_ray.evaluation.compare."""
import sys

from rlsr_ray.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main())
