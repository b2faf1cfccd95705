"""The cores a process may use decide ONNX Runtime's default thread count (``nxm_deploy.machine.usable_cores``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nxm_deploy.machine import machine, usable_cores


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux interface")
def test_ort_sessions_default_to_the_cores_of_the_process_affinity(tmp_path):
    assert usable_cores() == len(os.sched_getaffinity(0))
    code = (
        "import os, onnx; from onnx import helper, TensorProto\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from nxm_deploy.machine import usable_cores\n"
        "from nxm_deploy.ort import make_session\n"
        "x = helper.make_tensor_value_info('x', TensorProto.FLOAT, [1])\n"
        "y = helper.make_tensor_value_info('y', TensorProto.FLOAT, [1])\n"
        "model = helper.make_model(helper.make_graph([helper.make_node('Relu', ['x'], ['y'])], 'g', [x], [y]),\n"
        "                          opset_imports=[helper.make_opsetid('', 17)])\n"
        "session = make_session(model.SerializeToString())\n"
        "print(usable_cores(), session.get_session_options().intra_op_num_threads, os.cpu_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cores, threads, total = map(int, out.stdout.split())
    assert cores == 1 and threads == 1  # one core allowed: one intra-op thread, whatever the machine has
    assert machine()["cpu_count"] == total  # the machine line still names every CPU of the machine
