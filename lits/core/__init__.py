"""No Ray, no torch: errors, settings, file names, storage, volumes, CT preprocessing, masks, metrics, reports."""
