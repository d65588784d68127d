"""Side-by-side benchmarks (see README.md here); each script runs on its own."""
