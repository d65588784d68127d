"""Running a bundle cut into pipeline stages: one session per stage, on its own device.

The manifest's "stages" list says, per stage, its file, its device ("cuda:1", "cpu") and the
tensors it takes and hands on. Stage i's session runs on CUDA device i where onnxruntime has
CUDA and the process sees that GPU, and on the CPU otherwise (with a warning). A stream of
batches is pipelined: each stage has a worker thread, and batch k+1 enters stage 0 while batch
k is in stage 1, so the stages work at the same time (onnxruntime releases the GIL while it
computes). Each batch is one micro-batch of the pipeline, computed exactly as the single graph
computes it.

    >>> session = StagedSession("build/minilm-x86-server", manifest["stages"],
    ...                         outputs=["last_hidden_state"])
    >>> for (hidden,) in session.run_stream(batches): ...
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle import BundleError

_DONE = object()   # end of the stream, passed down the pipeline


@dataclass(frozen=True)
class TensorInfo:
    """What `get_inputs()`/`get_outputs()` return, like onnxruntime's NodeArg."""

    name: str
    shape: list
    type: str


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def device_providers(device: str, providers: Sequence) -> list:
    """onnxruntime providers for a stage's device: "cuda:N" pins CUDA (and TensorRT) to
    device N; "cpu" keeps only the CPU provider."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if not isinstance(device, str) or not device.startswith("cuda:") \
            or not device[5:].isdigit():
        raise BundleError(f"Unknown stage device {device!r} in manifest.json "
                          f"(expected 'cpu' or 'cuda:N').")
    chosen = []
    for p in providers:
        name, options = p if isinstance(p, tuple) else (p, {})
        pinned = name in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        # the caller's options (gpu_mem_limit ...) stay; the stage's device is added
        chosen.append((name, {**options, "device_id": int(device[5:])}) if pinned else p)
    return chosen


def visible_gpus() -> int:
    """How many CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies), as the CUDA
    driver counts them; 0 without a driver."""
    import ctypes

    try:
        driver = ctypes.CDLL("nvcuda.dll" if os.name == "nt" else "libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0   # CUDA_ERROR_NO_DEVICE where CUDA_VISIBLE_DEVICES hides every GPU
    return count.value


def placed_devices(devices: Sequence[str], providers: Sequence) -> list[str]:
    """The stages' devices as this process can hold them: a "cuda:N" stage whose GPU N it
    does not see runs on the CPU, and a warning says how many stages want a GPU and how many
    GPUs there are. (onnxruntime refuses a device_id past the last GPU, "Invalid device ID";
    its InferenceSession then printed "EP Error" to stdout and ran that stage on the CPU,
    which no warning said.) Without a GPU provider in this onnxruntime build nothing changes
    here: every stage runs on the CPU, and load's provider check says so."""
    import onnxruntime as ort

    names = [p[0] if isinstance(p, tuple) else p for p in providers]
    available = ort.get_available_providers()
    if not any(n in available for n in names
               if n in ("CUDAExecutionProvider", "TensorrtExecutionProvider")):
        return list(devices)
    wanted = [i for i, d in enumerate(devices) if isinstance(d, str)
              and d.startswith("cuda:") and d[5:].isdigit()]
    if not wanted:
        return list(devices)
    visible = visible_gpus()
    missing = [i for i in wanted if int(devices[i][5:]) >= visible]
    if missing:
        warnings.warn(f"{len(wanted)} pipeline stages want a GPU "
                      f"({', '.join(devices[i] for i in wanted)}) and this process sees "
                      f"{visible}: stage{'s' if len(missing) > 1 else ''} "
                      f"{', '.join(map(str, missing))} run{'' if len(missing) > 1 else 's'} "
                      f"on the CPU. Make {max(int(devices[i][5:]) for i in wanted) + 1} GPUs "
                      f"visible (CUDA_VISIBLE_DEVICES), or load with providers="
                      f"['CPUExecutionProvider'] to run every stage on the CPU.",
                      RuntimeWarning, stacklevel=6)   # runtime.load's caller
    return ["cpu" if i in missing else d for i, d in enumerate(devices)]


def stage_threads(threads: int, chosen: Sequence[list]) -> list[int]:
    """Intra-op threads per stage. The stages of a pipeline compute at the same time, so
    with `threads` 0 ("all cores") the stages on the CPU share this process's cores, each
    getting its part (at least one): two stages of all cores each contend for them (measured
    on 2 cores, MiniLM in 2 stages, 1,000 texts in batches of 8: 1.12 s, against 0.62 s with
    a core each). A stage on a GPU keeps 0, and an explicit count is every stage's."""
    import onnxruntime as ort

    from .model import usable_cores

    gpu = {"CUDAExecutionProvider", "TensorrtExecutionProvider"} \
        & set(ort.get_available_providers())
    on_cpu = [not any((p[0] if isinstance(p, tuple) else p) in gpu for p in providers)
              for providers in chosen]
    if threads or sum(on_cpu) < 2:
        return [threads] * len(chosen)
    share = max(1, usable_cores() // sum(on_cpu))
    return [share if cpu else 0 for cpu in on_cpu]


class Stages:
    """The stage plan of a manifest: which tensors each stage reads, makes and passes on.

    The plan is checked as a whole before anything runs: every tensor a stage reads is a
    graph input (`inputs`; without them, whatever no stage makes) or made by an earlier
    stage, and every output of the graph is made by some stage."""

    def __init__(self, stages: list[dict], outputs: Sequence[str],
                 inputs: Sequence[str] | None = None):
        if not stages or not isinstance(stages, list):
            raise BundleError(f"manifest.json: 'stages' must be a non-empty list, "
                              f"got {stages!r}.")
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict):
                raise BundleError(f"manifest.json: stage {i} must be an object, got {stage!r}.")
            for key in ("file", "device", "inputs", "outputs"):
                if key not in stage:
                    raise BundleError(f"manifest.json: stage {i} has no {key!r}.")
            for key in ("file", "device"):
                if not isinstance(stage[key], str):
                    raise BundleError(f"manifest.json: stage {i} {key!r} must be a string, "
                                      f"got {stage[key]!r}.")
            for key in ("inputs", "outputs"):
                if not isinstance(stage[key], list) or not all(
                        isinstance(t, dict) and isinstance(t.get("name"), str)
                        for t in stage[key]):
                    raise BundleError(f"manifest.json: stage {i} {key!r} must be a list of "
                                      f"{{\"name\": str, ...}}, got {stage[key]!r}.")
        self.plan = stages
        self.final = list(outputs)
        if not self.final:   # the caller's results would be empty lists
            raise BundleError("manifest.json: 'outputs' names no graph output; a staged "
                              "bundle lists what the pipeline hands back; re-export the "
                              "bundle.")
        self.inputs = [[t["name"] for t in s["inputs"]] for s in stages]
        self.outputs = [[t["name"] for t in s["outputs"]] for s in stages]
        made = {n for names in self.outputs for n in names}
        self.graph_inputs = list(inputs) if inputs is not None else list(dict.fromkeys(
            n for names in self.inputs for n in names if n not in made))
        available = set(self.graph_inputs)
        for i, names in enumerate(self.inputs):
            missing = [n for n in names if n not in available]
            if missing:
                raise BundleError(f"manifest.json: stage {i} ({stages[i]['file']}) reads "
                                  f"{missing}, which no graph input or earlier stage makes; "
                                  f"re-export the bundle.")
            available |= set(self.outputs[i])
        unread = [n for n in self.graph_inputs if not any(n in names for names in self.inputs)]
        if unread:   # a feed no stage takes: the graph does not read what it declares
            raise BundleError(f"manifest.json: the graph inputs {unread} are read by no "
                              f"stage; re-export the bundle.")
        missing = [n for n in self.final if n not in available]
        if missing:
            raise BundleError(f"manifest.json: the graph outputs {missing} are made by no "
                              f"stage; re-export the bundle.")
        # tensors still needed after stage i: read by a later stage, or a final output
        self.keep = []
        for i in range(len(stages)):
            later = {n for names in self.inputs[i + 1:] for n in names}
            self.keep.append(later | set(self.final))

    def step(self, i: int, session, env: dict) -> dict:
        """Run stage i on the tensors in `env`; returns what later stages and the caller
        still need."""
        missing = [n for n in self.inputs[i] if n not in env]
        if missing:
            raise ValueError(f"Stage {i} needs {missing}, which no feed or earlier stage made.")
        made = session.run(self.outputs[i], {n: env[n] for n in self.inputs[i]})
        env = {**env, **dict(zip(self.outputs[i], made, strict=True))}
        return {n: v for n, v in env.items() if n in self.keep[i]}


def check_stage_graph(plan: Stages, i: int, session) -> None:
    """Stage i's graph takes the tensors the manifest says it reads and makes the ones it
    says it hands on (a manifest edited apart from its stage files fails here, at load)."""
    takes = [t.name for t in session.get_inputs()]
    makes = {t.name for t in session.get_outputs()}
    if set(takes) != set(plan.inputs[i]) or not set(plan.outputs[i]) <= makes:
        raise BundleError(f"manifest.json: stage {i} ({plan.plan[i]['file']}) lists inputs "
                          f"{plan.inputs[i]} and outputs {plan.outputs[i]}, but its graph "
                          f"takes {takes} and makes {sorted(makes)}; re-export the bundle.")


class _StagedIO:
    """onnxruntime's get_inputs/get_outputs for a staged model, from the manifest."""

    plan: Stages

    def _describe(self, inputs: Sequence[dict]) -> None:
        stages = self.plan.plan
        described = {t["name"]: t for s in stages for t in (*s["inputs"], *s["outputs"])}
        self._inputs = [TensorInfo(i["name"], i.get("shape", []), i.get("dtype", ""))
                        for i in inputs] or [
            TensorInfo(n, described[n].get("shape", []), described[n].get("dtype", ""))
            for n in self.plan.graph_inputs]
        self._outputs = [TensorInfo(n, described.get(n, {}).get("shape", []),
                                    described.get(n, {}).get("dtype", ""))
                         for n in self.plan.final]

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)


class StagedSession(_StagedIO):
    """Sessions for a staged bundle, with onnxruntime's `run` interface plus `run_stream`."""

    def __init__(self, directory: str | Path, stages: list[dict], *, outputs: Sequence[str],
                 inputs: Sequence[dict] = (), threads: int = 0, spinning: bool = True,
                 providers: Sequence = ("CPUExecutionProvider",)):
        from .model import ort_session

        self.plan = Stages(stages, outputs, [i["name"] for i in inputs] if inputs else None)
        directory = Path(directory)
        # where each stage runs: its manifest device, or the CPU where that GPU is not here
        self.devices = placed_devices([s["device"] for s in stages], providers)
        chosen = [device_providers(device, providers) for device in self.devices]
        self.threads = stage_threads(threads, chosen)
        self.sessions = [ort_session(directory / s["file"], threads=n, spinning=spinning,
                                     providers=p)
                         for s, n, p in zip(stages, self.threads, chosen, strict=True)]
        for i, session in enumerate(self.sessions):
            check_stage_graph(self.plan, i, session)
        # what each stage runs on: the provider its session took (`devices` says where it
        # was meant to; a CUDA stage on a CPU-only onnxruntime runs here on the CPU)
        self.providers = [session.get_providers()[0] for session in self.sessions]
        self._describe(inputs)

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        """One batch through every stage in turn (onnxruntime's `InferenceSession.run`)."""
        env = dict(feeds)
        for i, session in enumerate(self.sessions):
            env = self.plan.step(i, session, env)
        return [env[n] for n in (output_names or self.plan.final)]

    def run_stream(self, feeds: Iterable[dict], output_names=None) -> Iterator[list]:
        """Outputs for each batch of `feeds`, in order, with the stages pipelined: one
        worker thread per stage, at most two batches waiting between two stages."""
        names = list(output_names or self.plan.final)
        links = [queue.Queue(maxsize=2) for _ in range(len(self.sessions) + 1)]
        stop = threading.Event()   # the caller stopped: every thread drops what it holds

        def put(i: int, item) -> bool:
            while not stop.is_set():
                try:
                    links[i].put(item, timeout=_POLL_S)
                    return True
                except queue.Full:
                    pass
            return False

        def get(i: int):
            while not stop.is_set():
                try:
                    return links[i].get(timeout=_POLL_S)
                except queue.Empty:
                    pass
            return _DONE

        def feed():
            try:
                for item in feeds:
                    if stop.is_set() or not put(0, dict(item)):
                        return
            except BaseException as e:  # the caller's iterable failed: raised in its thread
                put(0, _Failure(e))
            finally:
                put(0, _DONE)

        def work(i: int, session):
            while True:
                item = get(i)
                if item is not _DONE and not isinstance(item, _Failure):
                    try:
                        item = self.plan.step(i, session, item)
                    except BaseException as e:  # handed to the caller's thread
                        item = _Failure(e)
                if not put(i + 1, item) or item is _DONE:
                    return

        threads = [threading.Thread(target=feed, daemon=True)] + [
            threading.Thread(target=work, args=(i, s), daemon=True)
            for i, s in enumerate(self.sessions)]
        for t in threads:
            t.start()
        try:
            while (item := links[-1].get()) is not _DONE:
                if isinstance(item, _Failure):
                    raise item.error
                yield [item[n] for n in names]
        finally:
            # Stopped early, or failed: the workers drop what they hold at their next hand-
            # off. Nothing waits for the feed, which may be blocked in the caller's source.
            stop.set()


# How often a pipeline thread waiting on a full or empty queue looks whether to stop.
_POLL_S = 0.05


def run_batches(session, feeds: Iterable[dict]) -> Iterator[list]:
    """Each batch's outputs: pipelined for staged sessions, one after another otherwise. A
    single batch has nothing to overlap with: it runs the stages in turn, in this thread
    (starting a thread per stage for it cost more than its compute on MiniLM)."""
    single = isinstance(feeds, Sequence) and len(feeds) < 2
    if hasattr(session, "run_stream") and not single:
        return session.run_stream(feeds)
    return (session.run(None, f) for f in feeds)
