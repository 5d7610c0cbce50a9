"""What both stages and everything around them share: the config, errors and secrets, locations and storage, the
Spark session, the Delta table primitives, run reports, progress, the write lease and the backbone registry.
Imports nothing else of the package."""
