"""The embedded synthetic world: procedural scenes with exact instance masks and language."""
