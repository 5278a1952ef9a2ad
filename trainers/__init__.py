"""Trainers: one module per optimisation algorithm (added by later work)."""
