"""Ray actor roles of rlsr_ray: plain classes, one role per module, wrapped with ray.remote by pool.py."""
