"""Sampling: guidance, seeded noise, diffusers-based samplers, and the distributed sampling run."""
