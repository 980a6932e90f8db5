"""What a run will ask for before it starts: resources and batch arithmetic (resources.py), the
bytes each pool keeps per device (memory.py, from first principles) and the plan that refuses a run
that would not fit (memory_plan.py; `python -m rlsr_ray.plan` prints it)."""
