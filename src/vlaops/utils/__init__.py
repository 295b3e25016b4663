"""Small helpers shared by every package: atomic writes and the project logger."""
