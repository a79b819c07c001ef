"""Routing analyses (paper section 5) and figures: routing.py collects, metrics.py computes,
analyses.py assembles JSON, plots.py draws, run.py drives them on a workdir."""
