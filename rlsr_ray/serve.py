"""`python -m rlsr_ray.serve`: see rlsr_ray.serving.policy_server."""
import sys

from rlsr_ray.serving.policy_server import main

if __name__ == "__main__":
    sys.exit(main())
