"""`python -m rlsr_ray.run`: see rlsr_ray.driver.run."""
import sys

from rlsr_ray.driver.run import main

if __name__ == "__main__":
    sys.exit(main())
