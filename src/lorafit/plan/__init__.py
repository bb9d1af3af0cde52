"""Know before you run: the GPU memory of a lorafit training run, predicted by arithmetic over the model's shapes.

    from lorafit.plan import plan_command, fit_to_budget, budget_bytes
    plan_command("qwen2.5-7b", "qlora", seq=2048, batch=4, gpu="rtx4090")   # prints the table, returns its data
    cfg_overrides = fit_to_budget(cfg, budget_bytes("12GB"))                 # settings that fit, fastest first

`memory` (lorafit's own step), `allocator` (what the caching allocator reserves around it), `recipe` (the usual
transformers + PEFT + bitsandbytes recipe, for comparison), `fit` (verdicts and setting search), `report` (tables),
`stream` (layer streaming: resident layers, PCIe traffic and step time), `presets` (model shapes and cards, from the
YAML facts in presets/), `trace` (the check: lorafit's real code run on the meta device, and a replay of the CUDA
caching allocator).
"""

from lorafit.plan.fit import fit_to_budget, make_plan
from lorafit.plan.presets import PlanError, budget_bytes, resolve_card, resolve_model
from lorafit.plan.report import fits_command, plan_command

__all__ = ["PlanError", "budget_bytes", "fit_to_budget", "fits_command", "make_plan", "plan_command", "resolve_card",
           "resolve_model"]
