"""Architecture registry: per Hugging Face ``model_type``, which Linears get the n:m pattern, which stay dense and
why, and where INT8 attention can be placed.

One entry per architecture family (after Optimum's model registries). Targets are chosen by **module role**
(attention Q, K, V, output; MLP up and down) as the suffix of a module name inside a transformer block, not by
one glob; a recipe's ``sparsity.include`` / ``exclude`` globs still override (:func:`~nxm_deploy.sparsity.targets.select_targets`).
n:m groups always run along a layer's reduction (input) axis (NVIDIA's 2:4 rule, NxMTransformer §3).

A model type without an entry falls back to every ``nn.Linear`` inside its blocks (:data:`FALLBACK_BLOCKS`), with
a warning that lists what was chosen.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Architecture:
    """What nxm-deploy knows about one architecture family.

    Attributes:
        name: display name.
        model_types: the ``config.model_type`` values it covers.
        block: fnmatch glob of the modules inside one transformer block (e.g. ``*.encoder.layer.*``).
        roles: role -> module-name suffix (relative to the block) of that projection: ``q``, ``k``, ``v``, ``o``
            (attention output), ``up``, ``down`` (MLP), ``gate`` (gated MLP), ``qkv`` (fused Q/K/V).
        dense: fnmatch glob -> why a Linear it matches stays dense even inside a block.
        attention: the ``(q, k, v)`` child names of the self-attention module, where the attention goes through
            transformers' ``AttentionInterface`` (so INT8 attention can be placed), else None.
        attention_note: why INT8 attention is not available (when ``attention`` is None).
        decoder_only: a decoder-only language model (causal LM task allowed; classification pools the last token).
    """

    name: str
    model_types: tuple[str, ...]
    block: str
    roles: dict[str, str]
    dense: dict[str, str] = field(default_factory=dict)
    attention: tuple[str, str, str] | None = None
    attention_note: str = ""
    decoder_only: bool = False

    def role_of(self, fqn: str) -> str | None:
        """The role of a module fqn inside a block (``q``, ``k``, ...), or None."""
        if not fnmatch.fnmatchcase(fqn, self.block):
            return None
        for role, suffix in self.roles.items():
            if fqn.endswith("." + suffix):
                return role
        return None

    def dense_reason(self, fqn: str) -> str | None:
        """Why the module stays dense (a :attr:`dense` rule it matches), or None."""
        return next((why for glob, why in self.dense.items() if fnmatch.fnmatchcase(fqn, glob)), None)


_BERT_ROLES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"}

REGISTRY: tuple[Architecture, ...] = (
    Architecture("BERT family", ("bert", "roberta", "xlm-roberta", "camembert", "electra"), "*.encoder.layer.*",
                 _BERT_ROLES, attention=("query", "key", "value")),
    Architecture("DistilBERT", ("distilbert",), "*.transformer.layer.*",
                 {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
                  "up": "ffn.lin1", "down": "ffn.lin2"},
                 attention=("q_lin", "k_lin", "v_lin")),
    Architecture("MPNet", ("mpnet",), "*.encoder.layer.*",
                 {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v", "o": "attention.attn.o",
                  "up": "intermediate.dense", "down": "output.dense"},
                 attention_note="MPNet computes its attention (with a relative position bias) in its own code, "
                                "not through transformers' AttentionInterface"),
    Architecture("DeBERTa-v2/v3", ("deberta-v2",), "*.encoder.layer.*",
                 {"q": "attention.self.query_proj", "k": "attention.self.key_proj", "v": "attention.self.value_proj",
                  "o": "attention.output.dense", "up": "intermediate.dense", "down": "output.dense"},
                 dense={"*.pos_key_proj": "acts on the constant relative-position table, which the ONNX export folds "
                                          "into a constant: no GEMM is left to run sparse",
                        "*.pos_query_proj": "acts on the constant relative-position table, which the ONNX export "
                                            "folds into a constant: no GEMM is left to run sparse"},
                 attention_note="DeBERTa's disentangled attention is its own code, not transformers' AttentionInterface"),
)

_DECODER_ATTENTION = ("q_proj", "k_proj", "v_proj")

REGISTRY = REGISTRY + (
    Architecture("OPT", ("opt",), "*.decoder.layers.*",
                 {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
                  "up": "fc1", "down": "fc2"}, attention=_DECODER_ATTENTION, decoder_only=True),
    Architecture("Llama family", ("llama", "mistral", "qwen2"), "*.layers.*",
                 {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                  "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}, attention=_DECODER_ATTENTION,
                 decoder_only=True),
)

REGISTRY = REGISTRY + (
    # GPT-2's Conv1D projections are loaded as the equal nn.Linear (nxm_deploy.models.conv1d_to_linear_)
    Architecture("GPT-2", ("gpt2",), "*.h.*",
                 {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
                 attention_note="GPT-2 computes Q, K and V in one fused GEMM (c_attn); INT8 attention needs the "
                                "three projections apart", decoder_only=True),
)

#: blocks of an unknown architecture: every Linear inside one is a target (with a warning)
FALLBACK_BLOCKS = ("*.layer.*", "*.layers.*", "*.h.*", "*.block.*", "*.blocks.*")


def architecture_of(model_type: str | None) -> Architecture | None:
    """The registry entry of a ``config.model_type``, or None."""
    return next((a for a in REGISTRY if model_type in a.model_types), None)


def supported_model_types() -> list[str]:
    """Every ``model_type`` the registry supports."""
    return [t for a in REGISTRY for t in a.model_types]
