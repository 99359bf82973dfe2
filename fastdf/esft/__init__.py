"""Expert-Specialised Fine-Tuning of MoE LLMs (DESIGN.md §1, §4; issue #5)."""

_PENDING = "it arrives with the ESFT capability (issue #5)"


def _pending(name):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"fastdf.esft.{name} is not built yet: {_PENDING}")

    stub.__name__ = name
    stub.__doc__ = f"DESIGN.md §4 fastdf.esft.{name}. Not built yet."
    return stub


collect_routing_stats = _pending("collect_routing_stats")
select_experts = _pending("select_experts")
apply = _pending("apply")
save = _pending("save")
load = _pending("load")
merge = _pending("merge")
