"""TensorRT engine builds. The only module that imports ``tensorrt`` (lazily, inside functions).

Works with TensorRT 10 and 11: networks are strongly typed (INT8 only from Q/DQ, FP16 only from an FP16
graph), so no ``BuilderFlag.FP16/INT8`` is ever set (both were removed in 11); ``SPARSE_WEIGHTS`` and the
``STRONGLY_TYPED`` creation flag are probed with ``hasattr`` on the installed version.

Polygraphy's TensorRT loaders do the builder configuration (``CreateConfig``: sparse weights, profiles,
workspace pool, optimization level, ``ProfilingVerbosity.DETAILED``, timing cache load under a file lock) and
the build (``EngineBytesFromNetwork``: timing cache merge-and-save under a file lock). The network is created
and parsed here, not with ``NetworkFromOnnxPath``, because Polygraphy only logs the parser's errors while we
must list every one of them in the error we raise; our own ``trt.ILogger`` also keeps the builder's error
lines and its ``(Sparsity)`` summary lines for the post-build check.

Environment probing (:func:`probe_environment`) needs neither ``tensorrt`` nor ``cuda-python``: it tries the
import and asks the NVIDIA driver (``libcuda`` / ``libnvidia-ml`` through ctypes) for the GPU.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nxm_deploy._lazy import require
from nxm_deploy.errors import EngineBuildError, MissingDependencyError

log = logging.getLogger("nxm_deploy.engine")

INSTALL_HINT = ("pip install 'nxm-deploy[trt]' (TensorRT >= 10 with cuda-python for CUDA 12 drivers, the same as "
                "[trt-cu12]; [trt-cu13] for CUDA 13 drivers) on a machine with an NVIDIA GPU and driver "
                "(Ampere/SM 8.0 or newer for 2:4 sparse tensor cores)")


# --------------------------------------------------------------------------------------------- environment


@dataclass
class GpuInfo:
    """The GPU the engine is built for (CUDA device 0 as the driver sees it, ``CUDA_VISIBLE_DEVICES`` applied)."""

    name: str
    compute_capability: str  # "9.0"
    driver: str | None  # NVIDIA driver version, e.g. "550.54.15" (NVML), None when NVML is absent
    cuda_driver_api: str  # highest CUDA version the driver supports, e.g. "12.4"
    cuda_runtime: str | None  # CUDA runtime of cuda-python, else torch's CUDA build, else None

    @property
    def sm(self) -> str:
        """``"90"`` for compute capability 9.0 (used in engine file names)."""
        return self.compute_capability.replace(".", "")

    @property
    def sparse_tensor_cores(self) -> bool:
        return int(self.compute_capability.split(".")[0]) >= 8


@dataclass
class Environment:
    """What this machine offers for engine builds. ``reason`` is None when a build can run."""

    tensorrt_version: str | None = None
    tensorrt_error: str | None = None
    gpu: GpuInfo | None = None
    gpu_error: str | None = None
    flags: dict = field(default_factory=dict)
    cuda: dict = field(default_factory=dict)  # driver API, runtime, TensorRT wheel and cuda-python CUDA versions
    cuda_error: str | None = None

    @property
    def problem(self) -> str | None:
        """What is missing or does not fit (TensorRT, the GPU, the CUDA versions) and how to fix it, in one line;
        None when nothing is."""
        if self.cuda_error and not (self.tensorrt_error or self.gpu_error):
            return self.cuda_error
        missing = [m for m in (self.tensorrt_error, self.gpu_error) if m]
        if not missing:
            return None
        return f"{'; '.join(missing)}. Install: {INSTALL_HINT}."

    @property
    def reason(self) -> str | None:
        """Why engines cannot be built here (:attr:`problem`), or None."""
        problem = self.problem
        return None if problem is None else f"cannot build TensorRT engines here: {problem}"

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.gpu is not None:
            out["gpu"]["sm"] = self.gpu.sm
        return out


def _load_cdll(names: list[str]):
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name), None
        except OSError as exc:
            errors.append(str(exc).split(":")[-1].strip() or name)
    return None, errors


def _driver_string(version: int) -> str:
    return f"{version // 1000}.{(version % 1000) // 10}"


def probe_gpu() -> tuple[GpuInfo | None, str | None]:
    """``(GpuInfo, None)`` for CUDA device 0, or ``(None, reason)``. Creates no CUDA context."""
    names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
    cuda, _ = _load_cdll(names)
    if cuda is None:
        return None, f"no NVIDIA GPU driver ({names[0]} not found)"
    try:
        return _query_gpu(cuda)
    except Exception as exc:  # noqa: BLE001 - an odd driver must not crash the probe
        return None, f"the NVIDIA driver could not be queried ({type(exc).__name__}: {exc})"


def _query_gpu(cuda) -> tuple[GpuInfo | None, str | None]:
    rc = cuda.cuInit(0)
    if rc != 0:
        return None, f"the NVIDIA driver cannot initialise CUDA (CUresult {rc}: no usable GPU)"
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None, "no CUDA GPU is visible (check CUDA_VISIBLE_DEVICES)"
    device = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(device), 0)
    buf = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(buf, 256, device)
    major, minor, version = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    cuda.cuDriverGetVersion(ctypes.byref(version))
    return GpuInfo(
        name=buf.value.decode(errors="replace"), compute_capability=f"{major.value}.{minor.value}",
        driver=_nvml_driver_version(), cuda_driver_api=_driver_string(version.value),
        cuda_runtime=_cuda_runtime_version(),
    ), None


def _nvml_driver_version() -> str | None:
    nvml, _ = _load_cdll(["nvml.dll"] if sys.platform == "win32" else ["libnvidia-ml.so.1", "libnvidia-ml.so"])
    if nvml is None:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
        buf = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buf, 96) == 0
        nvml.nvmlShutdown()
        return buf.value.decode() if ok else None
    except AttributeError:
        return None


def _cuda_runtime_version() -> str | None:
    for module in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            rt = require(module, "trt")
            err, version = rt.cudaRuntimeGetVersion()
            if int(err) == 0:
                return _driver_string(int(version))
        except Exception:  # noqa: BLE001 - optional: any failure means "unknown"
            continue
    torch = sys.modules.get("torch")
    return getattr(getattr(torch, "version", None), "cuda", None)


def probe_tensorrt() -> tuple[str | None, str | None]:
    """``(version, None)`` when ``tensorrt`` imports, else ``(None, reason)``."""
    try:
        trt = require("tensorrt", "trt")
    except MissingDependencyError as exc:
        cause = exc.__cause__
        what = f"{type(cause).__name__}: {cause}" if cause is not None else exc.message
        return None, f"TensorRT is not installed ({what})"
    return str(trt.__version__), None


def probe_environment() -> Environment:
    """TensorRT version, GPU and CUDA facts, or the reasons they are missing or do not fit. Never raises."""
    env = Environment()
    env.tensorrt_version, env.tensorrt_error = probe_tensorrt()
    env.gpu, env.gpu_error = probe_gpu()
    if env.tensorrt_version is not None:
        env.flags = tensorrt_capabilities()
    env.cuda = {"driver_api": env.gpu.cuda_driver_api if env.gpu else None,
                "runtime": env.gpu.cuda_runtime if env.gpu else None,
                "tensorrt_wheel_cuda": _wheel_cuda_major(), "cuda_python": _dist_version("cuda-python")}
    env.cuda_error = cuda_mismatch(**env.cuda)
    return env


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _wheel_cuda_major() -> int | None:
    """The CUDA major of the installed TensorRT wheel (``tensorrt-cu12-libs`` -> 12), or None."""
    import re
    from importlib import metadata

    for dist in metadata.distributions():
        found = re.fullmatch(r"tensorrt[-_]cu(\d+)(?:[-_].*)?", (dist.metadata.get("Name") or "").lower())
        if found:
            return int(found.group(1))
    return None


def _major(version: str | None) -> int | None:
    try:
        return int(str(version).split(".")[0]) if version else None
    except ValueError:
        return None


def cuda_mismatch(driver_api: str | None, runtime: str | None, tensorrt_wheel_cuda: int | None,
                  cuda_python: str | None) -> str | None:
    """Why the CUDA pieces of this machine do not fit together, in one line with the fix; None when they do.

    Rules: the TensorRT wheel and cuda-python must target the same CUDA major (a ``tensorrt-cu13`` wheel beside
    ``cuda-python`` 12, or the reverse, fails at the first CUDA call); and that CUDA major must not exceed what
    the driver supports (a CUDA 13 runtime on a driver for CUDA 12 fails to initialise). Within a major, CUDA's
    minor-version compatibility lets a newer runtime minor run on an older driver minor.
    """
    driver, wheel, cupy = _major(driver_api), tensorrt_wheel_cuda, _major(cuda_python)
    runtime_major = wheel or cupy or _major(runtime)
    fix = f"pip install 'nxm-deploy[trt-cu{driver}]'" if driver else "install the extra that matches the driver"
    if wheel is not None and cupy is not None and wheel != cupy:
        return (f"the TensorRT wheel targets CUDA {wheel} but cuda-python is {cuda_python} (CUDA {cupy}); "
                f"they must share a CUDA major: {fix}.")
    if driver is not None and runtime_major is not None and runtime_major > driver:
        return (f"the CUDA {runtime_major} runtime (TensorRT wheel / cuda-python) needs a newer NVIDIA driver than "
                f"this one (it supports CUDA {driver_api}): {fix}, or update the driver.")
    return None


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT imports and a CUDA GPU is visible; else the reason, in one line."""
    return probe_environment().reason


def tensorrt_capabilities() -> dict:
    """Which version-dependent TensorRT features exist (``hasattr`` probes): recorded in every manifest."""
    trt = require("tensorrt", "trt")
    return {
        "major": int(str(trt.__version__).split(".")[0]),
        "sparse_weights_flag": hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"),
        "strongly_typed_flag": hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"),
        "fp16_flag": hasattr(trt.BuilderFlag, "FP16"),  # removed in TensorRT 11; never set here
        "int8_flag": hasattr(trt.BuilderFlag, "INT8"),  # removed in TensorRT 11; never set here
    }


# --------------------------------------------------------------------------------------------- build


@dataclass
class BuildOutput:
    """A built engine and what the build said about it."""

    engine: bytes
    layer_json: str  # IEngineInspector.get_engine_information(LayerInformationFormat.JSON)
    sparsity_log: list[str]  # the builder's "(Sparsity) ..." INFO lines
    warnings: list[str]
    build_s: float
    flags: dict


_SEVERITY = {0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING", 3: "INFO", 4: "VERBOSE"}


def _make_logger(trt):
    """A ``trt.ILogger`` that keeps errors, warnings and ``(Sparsity)`` lines and forwards to ``logging``."""

    class _Recorder(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.sparsity: list[str] = []

        def log(self, severity, msg):  # noqa: A003 - TensorRT's name
            try:
                level = _SEVERITY.get(int(severity), "VERBOSE")
                if level in ("INTERNAL_ERROR", "ERROR"):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif level == "WARNING":
                    self.warnings.append(msg)
                    log.debug("TensorRT warning: %s", msg)
                if "(Sparsity)" in msg:
                    self.sparsity.append(msg)
                    log.info("TensorRT: %s", msg)
            except Exception:  # noqa: BLE001 - log() must not throw into TensorRT
                pass

    return _Recorder()


def _parser_error_text(error) -> str:
    """One ONNX parser error as text (``ParserError`` methods differ a little between versions)."""
    parts = []
    for attr in ("node_name", "node_operator", "node", "code", "desc"):
        func = getattr(error, attr, None)
        try:
            value = func() if callable(func) else None
        except Exception:  # noqa: BLE001
            value = None
        if value not in (None, "", -1):
            parts.append(f"{attr}={value}")
    return ", ".join(parts) or str(error)


def _network(trt, builder, logger, onnx_path: Path):
    """Strongly typed network parsed from ``onnx_path``; raises listing every parser error."""
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif int(str(trt.__version__).split(".")[0]) < 11:
        raise EngineBuildError(f"TensorRT {trt.__version__} cannot create strongly typed networks (need 10.0 or newer).")
    network = builder.create_network(flags)
    if network is None:
        raise EngineBuildError(f"TensorRT could not create a network: {'; '.join(logger.errors) or 'no message'}")
    trt.init_libnvinfer_plugins(logger, "")
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    errors = [_parser_error_text(parser.get_error(i)) for i in range(parser.num_errors)]
    if not ok or errors:
        listed = " | ".join(f"{i + 1}) {e}" for i, e in enumerate(errors)) or "; ".join(logger.errors) or "no message"
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path.name} ({len(errors)} errors): {listed}")
    return network, parser


def build_serialized_engine(onnx_path: str | Path, *, profile: dict[str, dict[str, list[int]]], sparse_weights: bool,
                            workspace_bytes: int, builder_optimization_level: int,
                            timing_cache: str | Path, tf32: bool = True) -> BuildOutput:
    """Build a serialized engine from ``onnx_path`` and read its layer information.

    Args:
        profile: ``{input: {"min": [B, L], "opt": [...], "max": [...]}}`` (one optimization profile).
        sparse_weights: set ``BuilderFlag.SPARSE_WEIGHTS`` (only for sparse engines).
        tf32: set ``BuilderFlag.TF32`` (FP32 layers may use TF32 tensor cores; Polygraphy's ``CreateConfig``
            clears it otherwise, which leaves every op outside the Q/DQ pairs on slow FP32 math).
        timing_cache: loaded when it exists, and saved (merged, under a lock) after the build.

    Raises:
        MissingDependencyError: TensorRT is not importable.
        EngineBuildError: parser errors (all listed), an unknown profile input, or a failed build.
    """
    trt = require("tensorrt", "trt")
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, Profile

    onnx_path = Path(onnx_path)
    timing_cache = Path(timing_cache)
    if sparse_weights and not hasattr(trt.BuilderFlag, "SPARSE_WEIGHTS"):
        raise EngineBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.SPARSE_WEIGHTS; build the spec dense.")
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineBuildError(f"TensorRT could not create a builder: {'; '.join(logger.errors) or 'no CUDA device?'}")
    network, parser = _network(trt, builder, logger, onnx_path)
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(profile):
        raise EngineBuildError(f"Profile inputs {sorted(profile)} do not match the network inputs {sorted(inputs)}.")
    trt_profile = Profile()
    for name, shapes in profile.items():
        trt_profile.add(name, min=tuple(shapes["min"]), opt=tuple(shapes["opt"]), max=tuple(shapes["max"]))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    config = CreateConfig(
        sparse_weights=sparse_weights,
        tf32=bool(tf32),
        profiles=[trt_profile],
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: int(workspace_bytes)},
        builder_optimization_level=int(builder_optimization_level),
        profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
        load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
    )
    start = time.perf_counter()
    try:
        engine_bytes = EngineBytesFromNetwork((builder, network, parser), config=config,
                                              save_timing_cache=str(timing_cache))()
    except Exception as exc:  # Polygraphy raises PolygraphyException after TensorRT logged the cause
        causes = " | ".join(logger.errors) or "no TensorRT error message"
        raise EngineBuildError(f"TensorRT build from {onnx_path.name} failed: {exc} (TensorRT: {causes})") from exc
    if engine_bytes is None:
        raise EngineBuildError(f"TensorRT build from {onnx_path.name} failed: {' | '.join(logger.errors) or 'no message'}")
    build_s = time.perf_counter() - start
    engine = bytes(engine_bytes)
    return BuildOutput(
        engine=engine, layer_json=engine_layer_json(engine, logger), sparsity_log=list(logger.sparsity),
        warnings=list(logger.warnings)[:50], build_s=round(build_s, 3),
        flags={
            "strongly_typed": True,
            "sparse_weights": bool(sparse_weights),
            "profiling_verbosity": "DETAILED",
            "builder_optimization_level": int(builder_optimization_level),
            "workspace_bytes": int(workspace_bytes),
            "tf32": bool(tf32),
            "builder_flags_set": (["SPARSE_WEIGHTS"] if sparse_weights else []) + (["TF32"] if tf32 else []),
            **tensorrt_capabilities(),
        },
    )


def engine_layer_json(engine: bytes, logger=None) -> str:
    """The engine inspector's JSON (``LayerInformationFormat.JSON``) of a serialized engine (needs the GPU)."""
    trt = require("tensorrt", "trt")
    logger = logger or trt.Logger(trt.Logger.ERROR)
    runtime = trt.Runtime(logger)
    cuda_engine = runtime.deserialize_cuda_engine(engine)
    if cuda_engine is None:
        raise EngineBuildError("TensorRT could not deserialize the engine it just built.")
    inspector = cuda_engine.create_engine_inspector()
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)
