"""Test utilities shipped with the package so tests and tools share them."""
