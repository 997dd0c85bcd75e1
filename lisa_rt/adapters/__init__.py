"""LiSA adapters lisa-rt ships for its model aliases (see README.md here for how each was fitted)."""
