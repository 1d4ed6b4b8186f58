"""Real-model evaluation: methods and KV-cache policies scored on a pretrained decoder's tasks (``attnzoo eval``)."""
