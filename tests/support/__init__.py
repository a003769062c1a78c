"""Support code for stampede's own tests, benchmarks and example load test.

Not part of the installed package: it lives in the source tree only.
"""
