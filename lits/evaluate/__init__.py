"""evaluate: pairing predictions with references, LiTS metrics per case, aggregates and reports."""
