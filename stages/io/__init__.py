"""What every stage shares: the stage graph read from dvc.yaml, atomic output writing, and the log and outcome a
stage's run() reports to whoever orchestrates it."""
