"""The benchmark suite (issue #5): ``python -m bench.run`` or ``tox -e bench``.

Every contender is started behind the same generated nginx configuration with
the same number of workers, loaded with wrk, and every result is reported as
a ratio against a baseline measured in the same run.
"""
