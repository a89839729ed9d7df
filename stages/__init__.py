"""One module per DVC stage: the domain logic, plain functions from inputs to outputs (no Prefect, no MLflow)."""
