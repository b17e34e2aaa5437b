"""The stream processors: faust-streaming agents that normalise, deduplicate, transform and apply
captured changes between the OA and the archive."""
