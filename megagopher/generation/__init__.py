"""Generation and scoring behind ``python -m megagopher.generate`` (whose module holds the command line,
the loading of a checkpoint and the public API, re-exported from here):

* ``core``: one sequence: the forward passes, the token choice, ``generate`` and ``score``;
* ``batch``: many sequences at once: ``generate_batch`` (rows of their own lengths, positions and stop
  conditions in one padded KV cache, finished rows dropped) and ``score_batch`` / ``score_tokens_batch``;
* ``progress``: the progress line of long runs (done/total, rate, ETA) on stderr.
"""
