"""`python -m rlsr_ray.plan`: print a run's memory plan (memory_plan.py) without starting it."""
USAGE = """usage: python -m rlsr_ray.plan [PRESET] [--section.key=value ...]

Prints the memory plan of a run: per pool and device, weights, gradients, optimizer states,
activations at the largest micro-batch, the logits' working set and vLLM's KV cache, against the
device's memory (pools.<role>.accelerator_type or device_memory_gb). Exit 1 when a pool is over:
rlsr_ray.run refuses such a run. PRESET: {presets}."""


def main(argv: list[str] | None = None) -> int:
    import sys

    from rlsr_ray.cli import split_preset
    from rlsr_ray.config import ConfigError, load_config, preset_names
    from rlsr_ray.plan.memory_plan import model_shape, plan, table
    from rlsr_ray.modeling.models import TINY, resolve_policy

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(presets=", ".join(preset_names())))
        return 0
    preset, argv = split_preset(argv)
    try:
        cfg = load_config(preset, argv)
    except ConfigError as e:
        print(f"rlsr_ray: error: {e}", file=sys.stderr)
        return 2
    policy = cfg.model.policy
    if policy == TINY:  # built here in under a second; every other name is read or looked up
        policy = resolve_policy(TINY, cfg.model.cache_dir)
    shape = model_shape(policy)
    if shape is None:
        print(f"rlsr_ray: error: model.policy={cfg.model.policy}: shape not known; give a local model folder "
              "(its config.json)", file=sys.stderr)
        return 2
    plans = plan(cfg, shape)
    print(f"{cfg.model.policy}: {shape.params / 1e9:.2f}B parameters")
    print(table(plans))
    bad = [x.refusal() for x in plans if x.over()]
    for line in bad:
        print(f"rlsr_ray: over: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
