"""Expert-Specialised Fine-Tuning of MoE LLMs (DESIGN.md §1, §4; Wang et al. 2024).

Measure which routed experts a task uses, train only those, save only those::

    from fastdf import esft
    stats = esft.collect_routing_stats(model, batches)      # paper's gate scores / token ratios
    selection = esft.select_experts(stats, method="gate", p=0.1)
    esft.apply(model, selection)                            # everything else frozen
    ... train the parameters that require grad ...
    esft.save(model, "out/")                                # trained experts + selection (atomic;
                                                            #   overwrite=True to replace a checkpoint)
    esft.load(fresh_base_model, "out/")                     # ESFT state restored (all or nothing)
    esft.merge(model)                                       # plain HF model again

Works with HF MoE models whose experts use transformers' ``@use_experts_implementation``
(DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral, OLMoE): the selected experts run through fastdf's
grouped GEMMs, whose backward computes weight gradients for them only.

Bad input (ids that are not ints, unknown layers, token ids outside the vocabulary, a
damaged or mismatched checkpoint, ...) raises TypeError/ValueError naming the argument,
or the file and the tensor, before anything changes; a failed apply or load leaves the
model exactly as it was.
"""

from .state import apply, is_applied, load, merge, save
from .stats import RoutingStats, collect_routing_stats, select_experts

__all__ = ["RoutingStats", "apply", "collect_routing_stats", "is_applied", "load", "merge", "save", "select_experts"]
