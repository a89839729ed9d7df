"""Metrics shared by the evaluate stage and the pre-training study: recommendation protocols and bootstrap
intervals, generation metrics and the rating sheet, the study's report."""
