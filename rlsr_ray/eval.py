"""`python -m rlsr_ray.eval`: see rlsr_ray.evaluation.eval."""
import sys

from rlsr_ray.evaluation.eval import main

if __name__ == "__main__":
    sys.exit(main())
