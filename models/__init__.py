"""Torch modules and losses (encoders, R-GCN, contrastive heads, recommender, decoder, baselines).

Knows nothing of files, Prefect or MLflow: stages/ feed it tensors.
"""
