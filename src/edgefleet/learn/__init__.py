"""Closing the loop from the field back to a better model: monitors after rollout, field data (hard examples
and their labels)."""
