"""train: losses, augmentation, patches, steps, checkpoints, ingest and the Ray trainer."""
