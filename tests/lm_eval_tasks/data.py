"""The test tasks' documents: local JSON files beside this one (lm-eval's custom_dataset hook), so
no dataset is fetched from a hub and the tasks load from any working directory."""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _split(name: str) -> dict:
    import datasets

    rows = json.loads((HERE / name).read_text())
    return {"test": datasets.Dataset.from_list(rows)}


def multiple_choice(**_) -> dict:
    return _split("rlsr_mc.json")


def generation(**_) -> dict:
    return _split("rlsr_gen.json")
