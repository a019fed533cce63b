"""Jobs: one tracked MLflow run each (evaluate, prune, train, iterative), from a config to saved results.

The commands are thin wrappers of these, and `compare` runs them as the cells of its grid, passing the
cell's tags; nothing here knows of flags or exit codes.
"""
