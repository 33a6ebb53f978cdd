"""Ray plumbing shared by the stages: the fan-out idiom and how worker processes log."""
