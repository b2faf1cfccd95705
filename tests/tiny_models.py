"""Tiny models shared by the tests: random HF classifiers and a pruned, quantized, exported tiny BERT."""

from __future__ import annotations

import torch


def tiny_classifier(model_type: str, vocab_size: int = 100):
    """A tiny random ``AutoModelForSequenceClassification`` (2 layers, width 32, 2 labels) of ``model_type``."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kwargs = dict(vocab_size=vocab_size, num_labels=2)
    if model_type == "distilbert":
        kwargs.update(n_layers=2, dim=32, n_heads=2, hidden_dim=64)
    else:
        kwargs.update(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
        if model_type == "electra":
            kwargs.update(embedding_size=32)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **kwargs))


def build_tiny_qdq(path, seed: int = 0, gemm_outputs: bool = False, attention: bool = False,
                   metadata: bool = False, calibration: str = "max", calibration_data: list[dict] | None = None,
                   **config):
    """Export a tiny 2:4 + INT8 fake-quant BERT classifier to ``path``; returns (model, target names).

    ``gemm_outputs``/``attention``: the quantizer groups of ``train.qat.quantizers`` (off: inputs and weights of
    the n:m GEMMs only). ``metadata``: store the n:m layer map as the export stage does (INT8 weights too).
    ``calibration``: activation calibration method (``"max"``, or ``"percentile"`` at 99.99, the recipe default).
    ``calibration_data``: batches of int64 ``[B, L]`` tensors (``input_ids``, ``attention_mask``,
    ``token_type_ids``) to calibrate on; default two batches of 4 random unpadded 32-token sequences.
    ``config``: ``BertConfig`` fields over the tiny ones (2 layers, width 64), e.g. a BERT-base shape.
    """
    import transformers

    from nxm_deploy.export.onnx import export_model
    from nxm_deploy.quantization import calibrate, export_mode, quantize_model_
    from nxm_deploy.quantization.placement import place_quantizers_, use_eager_attention
    from nxm_deploy.sparsity import NMPattern, nm_mask
    from nxm_deploy.sparsity.admm import apply_masks_
    from nxm_deploy.sparsity.targets import select_targets, target_names

    torch.manual_seed(seed)
    fields = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=64, num_labels=2)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**{**fields, **config})).eval()
    names = target_names(select_targets(model, NMPattern.parse("2:4")))
    apply_masks_(model, {f"{n}.weight": nm_mask(model.get_submodule(n).weight, "2:4") for n in names})
    quantize_model_(model, names)
    place_quantizers_(model, names, gemm_outputs=gemm_outputs, attention=attention)
    gen = torch.Generator().manual_seed(seed)
    batches = calibration_data or [
        {
            "input_ids": torch.randint(0, 1000, (4, 32), generator=gen),
            "attention_mask": torch.ones(4, 32, dtype=torch.int64),
            "token_type_ids": torch.zeros(4, 32, dtype=torch.int64),
        }
        for _ in range(2)
    ]

    def forward_loop(m):
        for batch in batches:
            m(**batch)

    calibrate(model, forward_loop, method=calibration)
    use_eager_attention(model)
    model.eval()
    sample = {k: v[:2, :16] for k, v in batches[0].items()}
    with export_mode(model):
        export_model(model, sample, path)
        if metadata:
            import onnx

            from nxm_deploy.export.int8_weights import store_int8_weights
            from nxm_deploy.export.onnx import layer_map_for, save_model
            from nxm_deploy.export.verify import write_sparsity_metadata

            proto = onnx.load(str(path))
            layer_map = layer_map_for(proto, model, names)
            store_int8_weights(proto, arithmetic="torch")
            write_sparsity_metadata(proto, "2:4", layer_map, names, "tests")
            save_model(proto, path)
    return model, names


def _module_at(name: str, path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_run_module():
    """``tests/trt/demo_run.py`` (synthetic MiniLM-shaped run directories for the engine tests), loaded by path."""
    from pathlib import Path

    return _module_at("demo_run", Path(__file__).resolve().parent / "trt" / "demo_run.py")


def tool_module(name: str):
    """``tools/<name>.py`` loaded by path, with ``tools/`` importable (a tool may import a sibling tool)."""
    import sys
    from pathlib import Path

    tools = Path(__file__).resolve().parents[1] / "tools"
    if str(tools) not in sys.path:
        sys.path.insert(0, str(tools))
    return _module_at(name, tools / f"{name}.py")


# Trainer tests: a dropout-free tiny BERT, a synthetic dataset and TrainingArguments for CPU.
NUM_EXAMPLES, SEQ_LEN, BATCH = 32, 8, 8  # 4 optimizer steps per epoch


def tiny_bert(seed: int = 0):
    """Tiny BERT classifier (2 layers, width 32), no dropout: training is a deterministic function of the data."""
    torch.manual_seed(seed)
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def tiny_dataset(n: int = NUM_EXAMPLES, seed: int = 1) -> list[dict]:
    """Synthetic sequences; the label is whether the first token id is in the upper half of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, SEQ_LEN), generator=gen)
    labels = (ids[:, 0] >= 32).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def training_args(out, **overrides):
    """CPU TrainingArguments for the tiny tests: batch 8, 3 epochs, lr 1e-3, no saving, no logging, seed 0."""
    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, per_device_eval_batch_size=BATCH,
        num_train_epochs=3, learning_rate=1e-3, use_cpu=True, report_to="none", disable_tqdm=True,
        save_strategy="no", logging_strategy="no", seed=0,
    )
    kwargs.update(overrides)
    from transformers import TrainingArguments

    return TrainingArguments(**kwargs)


def plant_third_nonzero(proto, init_name: str, axis: int) -> tuple[int, int]:
    """Give one n:m group (2 nonzeros of 4 along ``axis``) of initializer ``init_name`` a third nonzero, in place.

    Works on float weights (the new value is 0.5) and INT8 codes (7). Returns the (row, column) of the group's
    first element in the initializer's coordinates.
    """
    import numpy as np
    from onnx import numpy_helper

    (init,) = [t for t in proto.graph.initializer if t.name == init_name]
    array = numpy_helper.to_array(init).copy()
    moved = np.moveaxis(array, axis, -1)  # a view: [other, reduction]
    groups = moved.reshape(moved.shape[0], -1, 4)
    candidates = np.argwhere((groups != 0).sum(-1) == 2)
    assert len(candidates), "no 2:4 group with exactly 2 nonzeros to tamper with"
    other, group = (int(v) for v in candidates[len(candidates) // 2])
    slot = int(np.flatnonzero(groups[other, group] == 0)[0])
    moved[other, group * 4 + slot] = 0.5 if np.issubdtype(array.dtype, np.floating) else 7
    assert np.count_nonzero(array) == np.count_nonzero(numpy_helper.to_array(init)) + 1
    init.CopyFrom(numpy_helper.from_array(array, init_name))
    return (other, group * 4) if axis == 1 else (group * 4, other)


#: tiny random configs per model type (2 blocks, width 64): what tests/integration/test_architectures.py runs
TINY_CONFIGS = {
    "bert": {}, "roberta": {}, "electra": {"embedding_size": 64}, "mpnet": {},
    "distilbert": {"n_layers": 2, "dim": 64, "n_heads": 4, "hidden_dim": 128},
    # DeBERTa-v2 with its relative-position projections (pos_key_proj / pos_query_proj)
    "deberta-v2": {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "share_att_key": False,
                   "max_relative_positions": 64, "position_buckets": 16},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "llama": {"num_key_value_heads": 2},  # grouped-query attention, as Llama 3 / Qwen2 / Mistral
    # Conv1D projections; BOS/EOS inside the MiniLM vocabulary ([CLS], [SEP]) the tiny models share
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128, "bos_token_id": 101, "eos_token_id": 102},
}


#: special tokens of :func:`tiny_word_tokenizer` (ids 0-3, as BERT's [PAD] / [UNK] / [CLS] / [SEP] roles)
TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
#: vocabulary size of a model on :func:`tiny_word_tokenizer` (room for 28 words; a multiple of 4)
TINY_VOCAB = 32


def tiny_word_tokenizer(words, path) -> None:
    """Save a word-level tokenizer of ``words`` (plus :data:`TINY_SPECIALS`; ``[CLS] text [SEP]`` per document) to
    ``path``: a vocabulary of tens of tokens, so an LM head and its perplexity pass cost nothing next to a 30k one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*TINY_SPECIALS, *dict.fromkeys(words)])}
    assert len(vocab) <= TINY_VOCAB, len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(str(path))


def save_tiny_model_dir(model_type: str, path, words=None):
    """A directory ``model.source`` can name: a tiny random ``model_type`` config (2 blocks, width 64) with the
    embedded MiniLM tokenizer (30522 tokens), or, given ``words``, a word-level tokenizer of them
    (:func:`tiny_word_tokenizer`, :data:`TINY_VOCAB` tokens), for ``random_init`` recipes. Returns the path."""
    import shutil
    from pathlib import Path

    from transformers import AutoConfig

    from nxm_deploy.models import embedded_model_dir

    kwargs = dict(vocab_size=30522 if words is None else TINY_VOCAB)
    extra = TINY_CONFIGS.get(model_type, {})
    if model_type != "gpt2":
        kwargs["max_position_embeddings"] = 128
    if model_type not in ("distilbert", "gpt2"):
        kwargs.update(num_hidden_layers=2, hidden_size=64, num_attention_heads=4)
    if model_type not in ("distilbert", "opt", "gpt2"):
        kwargs["intermediate_size"] = 128
    kwargs.update(extra)
    path = Path(path)
    AutoConfig.for_model(model_type, **kwargs).save_pretrained(path)
    if words is not None:
        tiny_word_tokenizer(words, path)
        return path
    tokenizer = embedded_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, path / name)
    return path
