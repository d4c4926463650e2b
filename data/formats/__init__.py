"""Readers and writers for the on-disk formats of real data sets (see docs/formats.md)."""
