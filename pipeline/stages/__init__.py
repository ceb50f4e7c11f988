"""The run's stages, in stream order: read -> decode -> label -> write (masks: the
mask encoding the write stage, or the labeling actor, applies)."""
