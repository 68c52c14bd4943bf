"""The lab: experiment grids and their report, benchmarks, robustness probes, dataset descriptions and the
official scoring of containers. It uses the product (``training``'s core) and nothing in the product uses it."""
