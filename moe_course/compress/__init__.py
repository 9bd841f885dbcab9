"""Compression of trained MoE models (chapters 4 to 11). One module per technique, each imported on demand.

Every compression transform has one shape::

    f(model, <size target>, *, calib=None, inplace=False, **options) -> model

* the size target comes first and is named by what it sizes: ``keep`` (how much survives) for
  every technique that removes or factors something, ``bits`` for the quantizers;
* ``keep`` has one meaning everywhere: an **int** counts the units kept, a **float in (0, 1]** is
  the fraction kept; techniques that work per MoE layer also take **one value per layer**;
* everything else is keyword-only: ``calib`` (calibration batches of the *training* split, see
  :mod:`moe_course.calib`) for the data-driven techniques, ``inplace`` and the options;
* it never mutates its input unless ``inplace=True``, and physically shrinks what it removes.

==========================================  ===========  ====================================================
technique                                   size target  what an int / a float in (0, 1] keeps
==========================================  ===========  ====================================================
``pruning.prune_magnitude``                 ``keep``     expert weights (the rest are zeroed; sparsity = 1 - keep)
``sparsity.sparsify`` (``calib``)           ``keep``     expert weights per output (Wanda or magnitude; or 2:4)
``pruning.prune_experts`` (``calib``)       ``keep``     experts per layer (at least ``k``)
``pruning.skip_experts`` (``calib``)        (none)       dynamic: no size target, ``quantile`` sets the skip rate
``trimming.drop_experts`` (``calib``)       ``keep``     experts per layer (``scope="global"``: in total)
``trimming.drop_layers`` (``calib``)        ``keep``     MoE sub-layers (at least one)
``trimming.drop_blocks`` (``calib``)        ``keep``     transformer blocks (at least one)
``merging.merge_experts`` (``calib``)       ``keep``     merged experts per layer (M-SMoE groups)
``merging.hc_smoe`` (``calib``)             ``keep``     merged experts per layer (clusters)
``merging.mc_smoe`` (``calib``)             ``keep``     merged experts per layer; ``rank``, ``keep_sparse`` compress them
``merging.align_experts`` (``calib``)       (none)       permutes neurons only: the function is unchanged
``lowrank.lowrank_experts``                 ``keep``     singular values per expert matrix (int: the rank; float: energy)
``lowrank.share_experts``                   ``keep``     singular values of each expert's delta from the shared base
``quantization.quantize``                   ``bits``     bits per expert weight (one value, per layer, or per expert)
``quantization.quantize_rest``              ``bits``     bits per weight of the non-expert layers
``gptq.gptq`` (``calib``)                   ``bits``     bits per expert weight, rounding chosen by GPTQ
``awq.awq`` (``calib``)                     ``bits``     bits per expert weight, after activation-aware scaling
==========================================  ===========  ====================================================

``distillation.train_student`` is not a transform: knowledge distillation is training. It trains
the student it is given in place (towards a teacher) and returns it. ``recipes.pipeline`` chains
the transforms (and a distillation step) and measures every stage.

Modules: ``pruning``, ``sparsity``, ``quantization``, ``gptq``, ``awq``, ``distillation``, ``lowrank``, ``merging``, ``trimming``,
``recipes``. Nothing heavy is imported here.
"""
