"""Set-up run in every worker process of a Ray that rlsr_ray starts itself (runtime_env
`worker_process_setup_hook`; a Ray the run joins is left as its owner configured it)."""
import logging


def setup() -> None:
    # Ray Train's PlacementGroupCleaner asks the State API once a second whether the training
    # controller still lives. The State API is served by the dashboard, which a Ray started here
    # does not run (README, Security), so every ask fails and warns: hundreds of lines per SFT run
    # burying its progress. The placement group goes with that Ray when the command ends.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
