"""PsychSteer data generation: BIG5-CHAT rows written by a base model steered with DExperts.

``dexperts`` (the decoding), ``steering`` (loading the base and its experts), ``io`` (scenarios in,
rows out, the crash-safe part file), ``generate`` (the run and its quality gates), ``job`` (the
queued job), ``cli`` (``big5 datagen``).
"""
