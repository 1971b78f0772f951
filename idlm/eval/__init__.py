"""Evaluation and benchmarking: prompt sets, the AR vs ISD vs HF throughput bench, losslessness check."""
