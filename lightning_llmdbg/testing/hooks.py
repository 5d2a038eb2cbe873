"""Counting module hooks: what the tests and the soak benchmark check the callbacks leave behind."""

from __future__ import annotations

from torch import nn
from torch.nn.modules import module as module_globals

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def count_hooks(module: nn.Module) -> int:
    """Forward, forward-pre, backward and backward-pre hooks over every submodule, plus the global module hooks."""
    own = sum(len(getattr(m, d)) for m in module.modules() for d in HOOK_DICTS)
    global_hooks = (module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
                    module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks)
    return own + sum(map(len, global_hooks))
