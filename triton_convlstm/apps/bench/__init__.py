"""``python -m triton_convlstm bench``: this layer against the common formulation.

- :mod:`.cases`: what one case measures (shapes, implementations, one step, timers); shared by
  the command, the perf-regression suite (``bench/test_perf.py``) and ``bench/gpu_check.py``.
- :mod:`.baseline`: the common formulation (``EagerConvLSTM``).
- :mod:`.memory`: an exact count of live tensor bytes (peak memory on CPU).
- :mod:`.command`: the command line and the run; :mod:`.report`: its tables and plots;
  :mod:`.compare`: ``bench compare``.
"""
