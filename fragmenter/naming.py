"""Fragment names of the user's existing format (`shared/seed/SEED_FORMAT.md`).

`{model}_L{layer}_{component}_S{shard}_{sha16}.dat`, with layer N for
`blk.N.*`, -1 for the token embedding, -2 for `output.weight` and -3 for any
other tensor (whose component is then the full tensor name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYER_EMBEDDING = -1
LAYER_LM_HEAD = -2
LAYER_OTHER = -3

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
FRAGMENT_FILE = re.compile(
    r"^(?P<model>.+)_L(?P<layer>-?\d+)_(?P<component>.+)_S(?P<shard>\d+)_(?P<sha16>[0-9a-f]{16})\.dat$"
)


@dataclass(frozen=True)
class TensorRole:
    layer_index: int
    component: str
    fragment_type: str  # embedding | attention | shared | expert | router | lm_head | unknown
    is_always_active: bool


def tensor_role(name: str) -> TensorRole:
    if name == "token_embd.weight":
        return TensorRole(LAYER_EMBEDDING, "embedding", "embedding", True)
    if name == "output.weight":
        return TensorRole(LAYER_LM_HEAD, "lm_head", "lm_head", True)
    m = _BLOCK.match(name)
    if not m:
        return TensorRole(LAYER_OTHER, name, "unknown", True)
    layer, rest = int(m.group(1)), m.group(2)
    component = rest.removesuffix(".weight").removesuffix(".bias")
    if component.startswith("attn"):
        kind = "attention"
    elif component == "ffn_gate_inp":
        kind = "router"
    elif component.endswith("_exps"):
        kind = "expert"
    elif component.startswith("ffn"):
        kind = "shared"
    else:
        kind = "unknown"
    return TensorRole(layer, component, kind, kind != "expert")


def fragment_id(model: str, layer: int, component: str, shard: int, sha16: str) -> str:
    return f"{model}_L{layer}_{component}_S{shard}_{sha16}"
