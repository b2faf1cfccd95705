"""Benchmark ``check_onnx_sparsity`` on a BERT-base-shaped ONNX graph (~110M parameters).

Builds, in memory, 12 encoder layers of Q, K, V, O (768x768), FFN1 (768->3072) and FFN2 (3072->768)
weights stored as nn.Linear does (``[out, in]``, random 2:4 along ``in``) and read through
``Transpose(perm=[1, 0]) -> MatMul``, with the attention's activation x activation MatMuls, plus word
(30522x768), position (512x768) and token-type (2x768) embedding ``Gather`` initializers. Saves it to a
temp dir and times the check with loading (path) and without (an already loaded ``ModelProto``).

Usage:
    .venv/bin/python tools/bench_verify.py [--target-s 5.0] [--external-data]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nxm_deploy.export.verify import check_onnx_sparsity  # noqa: E402

HIDDEN, FFN, LAYERS, VOCAB, MAX_POS = 768, 3072, 12, 30522, 512
# the six ways to keep 2 of 4
_TWO_OF_FOUR = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]], bool)


def random_2of4(out_features: int, in_features: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ``[out, in]`` with exactly 2 nonzeros in every 4 consecutive entries along ``in``."""
    weight = rng.standard_normal((out_features, in_features), dtype=np.float32)
    weight[weight == 0] = 1.0
    mask = _TWO_OF_FOUR[rng.integers(0, 6, size=out_features * in_features // 4)].reshape(weight.shape)
    return weight * mask


def build_bert_base(seed: int = 0) -> tuple[onnx.ModelProto, dict[str, str], int]:
    """BERT-base-shaped graph; returns (model, layer map initializer -> module, parameter count)."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    layer_map: dict[str, str] = {}
    params = 0

    def add_init(name: str, array: np.ndarray) -> str:
        nonlocal params
        inits.append(numpy_helper.from_array(array, name))
        params += array.size
        return name

    def linear(x: str, module: str, out_f: int, in_f: int) -> str:
        w = add_init(f"{module}.weight", random_2of4(out_f, in_f, rng))
        layer_map[w] = module
        nodes.append(helper.make_node("Transpose", [w], [f"{module}.wT"], name=f"/{module}/Transpose", perm=[1, 0]))
        nodes.append(helper.make_node("MatMul", [x, f"{module}.wT"], [f"{module}.out"], name=f"/{module}/MatMul"))
        return f"{module}.out"

    word = add_init("embeddings.word_embeddings.weight", rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32))
    pos = add_init("embeddings.position_embeddings.weight", rng.standard_normal((MAX_POS, HIDDEN), dtype=np.float32))
    typ = add_init("embeddings.token_type_embeddings.weight", rng.standard_normal((2, HIDDEN), dtype=np.float32))
    nodes += [
        helper.make_node("Gather", [word, "input_ids"], ["we"], name="/embeddings/word/Gather"),
        helper.make_node("Gather", [pos, "position_ids"], ["pe"], name="/embeddings/pos/Gather"),
        helper.make_node("Gather", [typ, "token_type_ids"], ["te"], name="/embeddings/type/Gather"),
        helper.make_node("Add", ["we", "pe"], ["wpe"], name="/embeddings/Add"),
        helper.make_node("Add", ["wpe", "te"], ["h0"], name="/embeddings/Add_1"),
    ]
    h = "h0"
    for i in range(LAYERS):
        prefix = f"encoder.layer.{i}"
        q = linear(h, f"{prefix}.attention.self.query", HIDDEN, HIDDEN)
        k = linear(h, f"{prefix}.attention.self.key", HIDDEN, HIDDEN)
        v = linear(h, f"{prefix}.attention.self.value", HIDDEN, HIDDEN)
        nodes += [  # single-head attention stand-in: activation x activation MatMuls (not listed)
            helper.make_node("Transpose", [k], [f"{prefix}.kT"], name=f"/{prefix}/kT", perm=[0, 2, 1]),
            helper.make_node("MatMul", [q, f"{prefix}.kT"], [f"{prefix}.scores"], name=f"/{prefix}/scores"),
            helper.make_node("Softmax", [f"{prefix}.scores"], [f"{prefix}.probs"], name=f"/{prefix}/Softmax", axis=-1),
            helper.make_node("MatMul", [f"{prefix}.probs", v], [f"{prefix}.ctx"], name=f"/{prefix}/ctx"),
        ]
        o = linear(f"{prefix}.ctx", f"{prefix}.attention.output.dense", HIDDEN, HIDDEN)
        f1 = linear(o, f"{prefix}.intermediate.dense", FFN, HIDDEN)
        h = linear(f1, f"{prefix}.output.dense", HIDDEN, FFN)

    graph = helper.make_graph(
        nodes,
        "bert_base_2of4",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, [1, 128])
            for n in ("input_ids", "position_ids", "token_type_ids")
        ],
        [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, 128, HIDDEN])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model, layer_map, params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-s", type=float, default=5.0, help="time budget for load + check (s)")
    parser.add_argument("--external-data", action="store_true", help="save weights as external data")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    model, layer_map, params = build_bert_base()
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bert_base_2of4.onnx"
        t0 = time.perf_counter()
        if args.external_data:
            onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin")
        else:
            onnx.save_model(model, str(path))
        save_s = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20

        del model  # save_model(save_as_external_data=True) rewrites it in place: use the file

        t0 = time.perf_counter()
        report = check_onnx_sparsity(path, "2:4", layer_map=layer_map)
        load_check_s = time.perf_counter() - t0

        loaded = onnx.load(str(path))  # external data read here, outside the timing
        t0 = time.perf_counter()
        report_mem = check_onnx_sparsity(loaded, "2:4", layer_map=layer_map)
        check_s = time.perf_counter() - t0

    sparse = sum(layer.status == "sparse" for layer in report.layers)
    print(f"python {platform.python_version()}  numpy {np.__version__}  onnx {onnx.__version__}")
    print(f"cpu: {platform.processor() or platform.machine()}  cpu_count={os.cpu_count()}")
    print(f"model: {params:,} parameters, {size_mb:.0f} MiB on disk ({'external data' if args.external_data else 'single file'})")
    print(f"build {build_s:.2f} s, save {save_s:.2f} s")
    print(f"layers listed: {len(report.layers)} ({sparse} sparse), failures: {len(report.failures)}, ok={report.ok}")
    print(f"check_onnx_sparsity load + check: {load_check_s:.3f} s")
    print(f"check_onnx_sparsity check only  : {check_s:.3f} s")
    verdict = "PASS" if load_check_s < args.target_s and report.ok and report_mem.ok else "MISS"
    print(f"target {args.target_s:.1f} s (load + check): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
