"""Routing analytics: pure statistics, the accumulator, run loading, plots and the markdown report."""
