"""Analytic counts, the parity planner and the variant catalogue (paper Section 2): from configs alone."""
