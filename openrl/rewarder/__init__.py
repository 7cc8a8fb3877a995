"""Reward workers (CPU): user reward functions run as competing consumers. Not built yet."""
