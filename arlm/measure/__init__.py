"""Measurements that run a model: decode speed (``arlm bench``), and how and why it falls into
loops (``arlm loops probe`` / ``bench``), on held-out text of a corpus."""
