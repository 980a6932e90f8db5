"""The algorithm as pure functions: GRPO advantages, the clipped loss with KL, and the reward."""
