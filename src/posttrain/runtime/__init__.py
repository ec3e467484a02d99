"""Checkpoints, logging, seeding, device and thread choices."""
