"""Benchmarks for qaserve (not tests): `make bench`."""
