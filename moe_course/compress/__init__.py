"""Compression of trained MoE models (issue 3). One module per technique, each imported on demand:

* ``pruning``      magnitude pruning, expert pruning (frequency, NAEE), dynamic expert skipping
* ``quantization`` round-to-nearest quantization, packed storage, :class:`QuantizedExperts`
* ``distillation`` knowledge distillation into smaller MoE or dense students
* ``lowrank``      SVD low-rank experts and shared-base weight sharing
* ``merging``      expert merging
* ``trimming``     layer / expert trimming
* ``recipes``      combinations of the above

Every function takes a trained model and returns a new compressed model (the input is left
untouched unless ``inplace=True``). Nothing heavy is imported here.
"""
