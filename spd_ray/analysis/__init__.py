"""Analyses of a finished decomposition that run on one process: batches of a run's own data,
model comparison and activation plots. Clustering (`spd_ray.clustering`) builds on it."""
