"""Which parameters form a group, and where a transformer's blocks are.

Every callback in the package uses this module, so that ``"blocks"`` means the same thing everywhere:
one group per transformer block, found from the first numeric index in a module path that is shared by
at least two children (``transformer.h.3.*``, ``model.layers.3.*``, ``blocks.3.*``, ``encoder.layer.3.*``),
plus ``embeddings`` (``nn.Embedding`` modules and parameters whose name says ``emb``/``wte``/``wpe``),
``head`` (a top-level ``lm_head``/``head``/``output``/``classifier``/``score``), and the remaining
parameters by their top-level module (``ln_f``, ``norm``, …) once the wrappers around the blocks are
stripped.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

GroupSpec = Union[str, Mapping[str, Union[str, Sequence[str]]]]
GROUP_MODES = ("blocks", "param_groups", "parameters")

_COMPILE_WRAPPER = re.compile(r"(?:^|\.)_orig_mod(?=\.|$)")
_INDEX = re.compile(r"\.(\d+)(?=\.)")
_EMBEDDING_NAME = re.compile(r"(^|[._])(wte|wpe|embed\w*|\w*_emb|emb|embeddings?|tok_embeddings|pos_embed\w*)($|[._])")
_HEAD_NAMES = ("lm_head", "head", "output", "classifier", "score", "embed_out", "output_layer")


@dataclass
class ParameterGroups:
    """Trainable parameters split into named groups: each trainable parameter is in exactly one group."""

    groups: dict[str, list[tuple[str, nn.Parameter]]]
    frozen: list[str] = field(default_factory=list)


def closest_names(pattern: str, names: Iterable[str], n: int = 5) -> list[str]:
    """The names most similar to ``pattern`` (for "did you mean" messages)."""
    names = list(dict.fromkeys(names))
    plain = pattern.replace("*", "").replace("?", "")
    close = difflib.get_close_matches(plain, names, n=n, cutoff=0.3)
    return close or names[:n]


def no_match_error(kind: str, pattern: str, names: Iterable[str]) -> ValueError:
    suggestions = ", ".join(repr(s) for s in closest_names(pattern, names))
    return ValueError(f"The {kind} pattern {pattern!r} matches nothing. Closest {kind} names: {suggestions}.")


def block_index_of(names: Sequence[str]) -> dict[str, tuple[str, int]]:
    """Map each name that lies inside a transformer block to ``(container path, block index)``.

    The container is the path before the first numeric component; it only counts as a block container when
    at least two distinct indices appear under it (a lone ``.0.`` is a wrapper, not a stack of blocks).
    """
    found: dict[str, tuple[str, int]] = {}
    indices: dict[str, set[int]] = {}
    for name in names:
        match = _INDEX.search("." + name)
        if match is None:
            continue
        container = ("." + name)[1 : match.start()]
        index = int(match.group(1))
        found[name] = (container, index)
        indices.setdefault(container, set()).add(index)
    return {name: value for name, value in found.items() if len(indices[value[0]]) >= 2}


def _block_group_name(container: str, index: int, single_container: bool) -> str:
    return f"block_{index}" if single_container else f"{container}.{index}"


def _strip_trunk(name: str, trunk_parts: Sequence[str]) -> list[str]:
    """Drop the leading path components that wrap the block container (``model.transformer``)."""
    parts = name.split(".")
    i = 0
    while i < len(trunk_parts) and i < len(parts) - 1 and parts[i] == trunk_parts[i]:
        i += 1
    return parts[i:]


def plain_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` components that ``torch.compile``'s wrappers add, so that groups, keys and
    patterns read the same whether or not (and wherever) the model was compiled."""
    return _COMPILE_WRAPPER.sub("", name).lstrip(".")


def named_modules(root: nn.Module) -> dict[str, nn.Module]:
    """``root.named_modules()`` by plain name; of a compile wrapper and the module it wraps, the module."""
    return {plain_name(n): m for n, m in root.named_modules()}


def named_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(plain_name(n), p) for n, p in module.named_parameters()]


def _embedding_param_names(module: nn.Module) -> set[str]:
    names = set()
    for module_name, sub in named_modules(module).items():
        if isinstance(sub, nn.Embedding):
            for param_name, _ in sub.named_parameters(recurse=False):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def block_groups(module: nn.Module, named: Sequence[tuple[str, nn.Parameter]]) -> dict[str, list[str]]:
    """Group parameter names into ``embeddings``, one group per block, the rest by top-level module, ``head``."""
    names = [n for n, _ in named]
    blocks = block_index_of(names)
    containers = list(dict.fromkeys(c for c, _ in blocks.values()))  # in model order
    single = len(containers) == 1
    trunk = containers[0].split(".")[:-1] if containers else []
    embedding_names = _embedding_param_names(module)

    embeddings: list[str] = []
    per_block: dict[tuple[str, int], list[str]] = {}
    rest: dict[str, list[str]] = {}
    head: list[str] = []
    for name in names:
        if name in blocks:
            per_block.setdefault(blocks[name], []).append(name)
            continue
        parts = _strip_trunk(name, trunk)
        if name in embedding_names or _EMBEDDING_NAME.search(".".join(parts[:-1]) or parts[-1]):
            embeddings.append(name)
        elif len(parts) > 1 and parts[0] in _HEAD_NAMES:
            head.append(name)
        else:
            rest.setdefault(parts[0] if len(parts) > 1 else "other", []).append(name)

    groups: dict[str, list[str]] = {}
    if embeddings:
        groups["embeddings"] = embeddings
    for container, index in sorted(per_block, key=lambda k: (containers.index(k[0]), k[1])):
        groups[_block_group_name(container, index, single)] = per_block[(container, index)]
    for key, members in rest.items():
        groups.setdefault(key, []).extend(members)
    if head:
        groups.setdefault("head", []).extend(head)
    return groups


def glob_groups(spec: Mapping[str, str | Sequence[str]], names: Sequence[str]) -> dict[str, list[str]]:
    """Groups from ``{group: glob or [globs]}``; the first group that matches a name takes it."""
    groups: dict[str, list[str]] = {}
    taken: set[str] = set()
    for group, patterns in spec.items():
        members: list[str] = []
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            matched = fnmatch.filter(names, pattern)
            if not matched:
                raise no_match_error("parameter", pattern, names)
            members.extend(n for n in matched if n not in taken and n not in members)
        if not members:
            raise ValueError(f"Group {group!r}: every parameter its globs match is already in an earlier group.")
        taken.update(members)
        groups[group] = members
    return groups


def validate_group_spec(groups: GroupSpec) -> None:
    """Checks that need no model: raise ValueError naming the bad value."""
    if isinstance(groups, str):
        if groups not in GROUP_MODES:
            raise ValueError(
                f"Unknown `groups` mode {groups!r}. Use one of {', '.join(map(repr, GROUP_MODES))} "
                "or a dict {group_name: glob or [globs]}."
            )
    elif isinstance(groups, Mapping):
        if not groups:
            raise ValueError("`groups` is an empty dict; give at least one {group_name: glob}.")
        for group, patterns in groups.items():
            if not isinstance(group, str) or not group:
                raise ValueError(f"Group names must be non-empty strings, got {group!r}.")
            listed = [patterns] if isinstance(patterns, str) else patterns
            if not isinstance(listed, Sequence) or not listed or not all(isinstance(p, str) for p in listed):
                raise ValueError(f"Group {group!r} needs a glob or a non-empty list of globs, got {patterns!r}.")
    else:
        raise ValueError(f"`groups` must be a mode name or a dict of globs, got {groups!r}.")


def resolve_groups(
    module: nn.Module,
    groups: GroupSpec = "blocks",
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> ParameterGroups:
    """Split ``module``'s trainable parameters into named groups.

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        groups: ``"blocks"``, ``"param_groups"``, ``"parameters"`` or ``{group_name: glob or [globs]}`` over
            parameter names. Parameters no glob takes go to ``other``.
        optimizers: needed for ``"param_groups"``.

    Raises:
        ValueError: an unknown mode, or a glob that matches no parameter name (with the closest names).
    """
    validate_group_spec(groups)
    all_named = named_parameters(module)
    named = [(n, p) for n, p in all_named if p.requires_grad]
    frozen = [n for n, p in all_named if not p.requires_grad]
    by_name = dict(named)
    names = [n for n, _ in named]

    if groups == "parameters":
        name_groups = {n: [n] for n in names}
    elif groups == "blocks":
        name_groups = block_groups(module, named)
    elif groups == "param_groups":
        if not optimizers:
            raise ValueError('`groups="param_groups"` needs an optimizer, and the Trainer has none.')
        name_of = {id(p): n for n, p in named}
        name_groups = {}
        for opt_index, optimizer in enumerate(optimizers):
            for group_index, param_group in enumerate(optimizer.param_groups):
                label = param_group.get("name")
                if label is None:
                    label = f"group_{group_index}" if len(optimizers) == 1 else f"opt_{opt_index}_group_{group_index}"
                members = [name_of[id(p)] for p in param_group["params"] if id(p) in name_of]
                name_groups.setdefault(str(label), []).extend(members)
    else:
        name_groups = glob_groups(groups, names)

    assigned = {n for members in name_groups.values() for n in members}
    leftovers = [n for n in names if n not in assigned]
    if leftovers:
        name_groups.setdefault("other", []).extend(leftovers)
    return ParameterGroups(
        groups={g: [(n, by_name[n]) for n in members] for g, members in name_groups.items() if members},
        frozen=frozen,
    )


# -- modules -------------------------------------------------------------------------------------------------------
ModuleSpec = Union[str, Sequence[Union[str, type]]]
_ATTENTION_NAMES = re.compile(r"(^|\.)(attn|attention|self_attn|self_attention)$")


def _outermost(names: Sequence[str]) -> list[str]:
    """Drop every name that lies inside another name of the list (a pattern selects the outermost matches)."""
    chosen = set(names)
    return [n for n in names if not any(n.startswith(other + ".") for other in chosen if other != n)]


def block_modules(root: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks of ``root`` keyed as GradientMonitor's groups are (``block_3``, or ``encoder.block.3``)."""
    modules = named_modules(root)
    blocks = block_index_of([name + "." for name in modules])
    containers = list(dict.fromkeys(c for c, _ in blocks.values()))  # in model order
    found = {}
    for container, index in sorted(set(blocks.values()), key=lambda k: (containers.index(k[0]), k[1])):
        name = f"{container}.{index}"
        if name in modules:
            found[_block_group_name(container, index, len(containers) == 1)] = modules[name]
    return found


def _glob_matches(name: str, pattern: str) -> bool:
    # Patterns may be written relative to a wrapped model: "transformer.h.*" also matches "model.transformer.h.0".
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def _relative_key(name: str, pattern: str) -> str:
    """The part of ``name`` the pattern describes: wrappers before its first literal component are dropped."""
    if fnmatch.fnmatchcase(name, pattern):
        return name
    parts = name.split(".")
    for i in range(1, len(parts)):
        if fnmatch.fnmatchcase(".".join(parts[i:]), pattern):
            return ".".join(parts[i:])
    return name


def resolve_modules(root: nn.Module, spec: ModuleSpec = "blocks") -> dict[str, nn.Module]:
    """Modules to probe, keyed by the name used in logged keys.

    Args:
        root: the model.
        spec: ``"blocks"`` (each transformer block), or a list of globs over ``named_modules()`` names and/or
            module types. A glob selects the outermost modules it matches (``"transformer.h.*"`` gives the blocks,
            not every module inside them) and may be written relative to a wrapper (``"transformer.h.*"``
            matches ``model.transformer.h.0``); a type selects every module of that type.

    Raises:
        ValueError: a pattern or type that matches nothing (with the closest module names), or no blocks found.
    """
    validate_module_spec(spec)
    named = {n: m for n, m in named_modules(root).items() if n}
    names = list(named)
    if spec == "blocks":
        found = block_modules(root)
        if not found:
            raise ValueError(
                "No transformer blocks found (no module path with a numeric index shared by at least two modules). "
                f"Pass `modules=[...]` with globs over module names, e.g. {closest_names('layers', names, 3)}."
            )
        return found
    found: dict[str, nn.Module] = {}
    for item in spec:
        if isinstance(item, str):
            matched = _outermost([n for n in names if _glob_matches(n, item)])
            if not matched:
                raise no_match_error("module", item, names)
            keyed = [(_relative_key(n, item), n) for n in matched]
        else:
            keyed = [(n, n) for n, m in named.items() if isinstance(m, item)]
            if not keyed:
                kinds = sorted({type(m).__name__ for m in named.values()})
                raise ValueError(f"No module of type {item.__name__!r}. Module types present: {', '.join(kinds[:12])}.")
        for key, name in keyed:
            if key in found and found[key] is not named[name]:
                raise ValueError(f"Two modules would log as {key!r} (pattern {item!r}); write the pattern with more of the path.")
            found[key] = named[name]
    return found


def validate_module_spec(spec: ModuleSpec) -> None:
    if spec == "blocks":
        return
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise ValueError(f'`modules` must be "blocks" or a non-empty list of globs or module types, got {spec!r}.')
    for item in spec:
        if not (isinstance(item, str) and item) and not (isinstance(item, type) and issubclass(item, nn.Module)):
            raise ValueError(f"`modules` entries must be glob strings or nn.Module subclasses, got {item!r}.")


def attention_modules(within: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Attention modules: the outermost submodule named ``attn``/``attention``/``self_attn`` of each probed module."""
    found = {}
    for key, module in within.items():
        subs = named_modules(module)
        names = _outermost([n for n in subs if n and _ATTENTION_NAMES.search(n)])
        if _ATTENTION_NAMES.search(key) and not names:
            found[key] = module
        for n in names:
            found[f"{key}.{n}" if len(names) > 1 else key] = subs[n]
    return found


def head_module(root: nn.Module) -> nn.Module | None:
    """The output projection to the vocabulary: the first ``nn.Linear`` named as a head (``lm_head``, ``head``,
    ``output``, ``embed_out``, …) outside the blocks, if there is one."""
    modules = named_modules(root)
    blocks = block_index_of([name + "." for name in modules])
    for name, module in modules.items():
        if name.split(".")[-1] in _HEAD_NAMES and isinstance(module, nn.Linear) and name + "." not in blocks:
            return module
    return None
