"""Fuzz targets for every codec and the config loader: bytes in, AssertionError on a broken property.

Each target is a plain function of one ``bytes`` argument, so the same code is
driven by atheris (``make fuzz``, coverage-guided) and replayed over the
regression corpus in ``corpus/<target>/`` by ``tests/test_fuzz_corpus.py``.
"""
