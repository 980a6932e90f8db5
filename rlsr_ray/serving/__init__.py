"""Ray Serve: the policy's OpenAI-compatible endpoint and the shared reward service."""
