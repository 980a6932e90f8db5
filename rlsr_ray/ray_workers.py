"""Set-up run in every worker process of a Ray that rlsr_ray starts itself (runtime_env
`worker_process_setup_hook`; a Ray the run joins is left as its owner configured it)."""
import logging
import threading

# Ray Train's PlacementGroupCleaner asks the State API once a second whether the training
# controller still lives, and the controller stops it with a bounded wait at the end. The State
# API is served by the dashboard, which a Ray started here does not run (README, Security), so
# every ask fails with a warning (hundreds of lines per SFT run, burying its progress), the final
# stop may time out with a traceback, and the cleaner's thread may die with one when this Ray shuts
# down under it. None of it matters here: the placement group goes with this Ray when the command
# ends.
CLEANER_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                   "ray.train.v2._internal.callbacks.placement_group_callback")
CLEANER_THREAD = "PlacementGroupCleanerMonitor"  # its thread's name in Ray Train


def setup() -> None:
    # A filter, not a level: Ray Train's logging.config.dictConfig on the controller resets the
    # level of every logger under "ray.train", and leaves filters as they are.
    for name in CLEANER_LOGGERS:
        logging.getLogger(name).addFilter(lambda record: False)
    default = threading.excepthook

    def quiet_cleaner(args: threading.ExceptHookArgs) -> None:
        if args.thread is None or args.thread.name != CLEANER_THREAD:
            default(args)

    threading.excepthook = quiet_cleaner
