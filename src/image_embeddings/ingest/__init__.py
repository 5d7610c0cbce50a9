"""Stage 1 (CPU): list the photos, plan what is new, decode and downscale it, write the files and images tables.
Imports only ``core``: nothing of stage 2 (the pipeline hands in stage 2's warm-up)."""
