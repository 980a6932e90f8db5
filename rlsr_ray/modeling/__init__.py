"""The policy as torch sees it: model names resolved to local folders (models.py), loading, padding
and log-probs shared by every role (policy.py), LoRA adapters (lora.py) and the weight route's
buckets and process group (weight_group.py)."""
