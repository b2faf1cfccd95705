"""Engine specs: strict schema; the shipped specs are valid; the stage reports a reason where TensorRT is absent."""

from pathlib import Path

import pytest

from nxm_deploy.engine.spec import load_engine_spec
from nxm_deploy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "engines").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs(path):
    spec = load_engine_spec(path)
    assert spec.batch_size.min <= spec.batch_size.opt <= spec.batch_size.max
    assert spec.sparse_weights == (spec.precision == "int8-qdq")  # sparse INT8 engine vs dense baseline


def test_profile_order_and_unknown_keys(tmp_path):
    bad = tmp_path / "e.yaml"
    bad.write_text("name: e\nonnx: x.onnx\nprecision: int8-qdq\nbatch_size: {min: 4, opt: 2, max: 8}\n")
    with pytest.raises(ConfigError, match="min <= opt <= max"):
        load_engine_spec(bad)
    bad.write_text("name: e\nonnx: x.onnx\nprecision: int8\n")
    with pytest.raises(ConfigError, match="precision"):
        load_engine_spec(bad)
    bad.write_text("name: e\nonnx: x.onnx\nprecision: fp16\nfp16: true\n")
    with pytest.raises(ConfigError, match="fp16"):
        load_engine_spec(bad)
