"""Applications built on the library, kept out of its namespace: ``import triton_convlstm``
never imports them, and nothing in the library imports from here.

- :mod:`.demo`: ``python -m triton_convlstm demo``, a moving-digit nowcaster trained end to end.
- :mod:`.bench`: ``python -m triton_convlstm bench``, this layer against the common formulation;
  also the cases the perf-regression suite (``bench/test_perf.py``) times.
- :mod:`.cli`: what both commands share on the command line.
"""
