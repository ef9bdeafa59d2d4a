"""Worked examples: a user's own victim model (my_model.py) and its sweep spec."""
