"""Benchmarks: kernel timings, kernel IO and compile reports, end-to-end throughput."""
