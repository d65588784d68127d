"""Pipeline stages as Ray actors, one per stage (one per GPU), across the nodes of a cluster.

For when one machine does not hold enough GPUs: each stage's graph is sent to its actor as
bytes (no shared filesystem needed), the actor builds its own onnxruntime session, and a
stream of batches is pipelined by chaining actor calls on object references: actor k works on
batch j while actor k+1 works on batch j-1. Needs the `ray` extra (`pip install
edge-exporter[ray]`); `import runtime` never imports ray.

    >>> model = runtime.load("build/minilm-x86-server", pipeline="ray")   # ray.init() first
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .bundle import BundleError
from .stages import Stages, _StagedIO, check_stage_graph, device_providers

# How long Ray may take to grant the stage actors their GPUs and CPU shares (_reserve).
RESERVE_SECONDS = 10.0


class _StageWorker:
    """The actor body: one stage's session; `step` takes and returns the tensor dict."""

    def __init__(self, index: int, graph: bytes, stages: list[dict], outputs: list[str],
                 threads: int, providers: list, external_data: dict[str, bytes]):
        from .model import ort_session

        self.index = index
        self.plan = Stages(stages, outputs)
        self.providers = list(providers)
        self.session = ort_session(graph, threads=threads, providers=providers,
                                   external_data=external_data)

    def step(self, env: dict) -> dict:
        return self.plan.step(self.index, self.session, env)

    def check(self) -> tuple[str, str]:
        """The graph checked against the plan; returns (the provider asked for first among
        those this actor's onnxruntime has, the one its session took)."""
        from .model import available_providers

        check_stage_graph(self.plan, self.index, self.session)
        wanted = available_providers(self.providers)[0]
        return wanted[0] if isinstance(wanted, tuple) else wanted, \
            self.session.get_providers()[0]


def say_fallbacks(checked: Sequence[tuple[str, str]]) -> None:
    """A warning, in the process that loaded the bundle, naming each stage actor whose
    provider did not start (its GPU's CUDA failed: a GPU Ray counts that the node does not
    have, or missing libraries there). The actor's own warning and onnxruntime's log went
    to the actor's output only (seen on an H200: a declared second GPU gave stage 1 the
    CPU, and the caller heard nothing)."""
    fell = [f"stage {i} asked for {wanted} and runs on {taken}"
            for i, (wanted, taken) in enumerate(checked) if wanted != taken]
    if fell:
        warnings.warn(f"In the Ray stage actors, {'; '.join(fell)} (onnxruntime's log, "
                      f"forwarded from the actor, says why).", RuntimeWarning, stacklevel=5)


def actor_cpus(actors: int, node_cpus: Sequence[float], free: float) -> int:
    """CPUs for each of `actors` stage actors on the CPU, as `stage_threads` shares a
    process's cores among its CPU stages: the most of which `actors` actors fit on the
    nodes (`node_cpus`, each node's CPUs; an actor runs on one node) with at most `free`
    taken in all. 0 where not even one each fits: Ray would hold the actors back until CPUs
    free up, so they take none and run on one thread each."""
    for share in range(int(free // actors), 0, -1):
        if sum(int(cpus // share) for cpus in node_cpus) >= actors:
            return share
    return 0


def _threads_each(threads: int) -> str:
    return "on all cores" if not threads else f"on {threads} thread{'s' * (threads > 1)} each"


class RayStagedSession(_StagedIO):
    """A staged bundle's sessions as Ray actors, with StagedSession's interface."""

    def __init__(self, directory: str | Path, stages: list[dict], *, outputs: Sequence[str],
                 inputs: Sequence[dict] = (), threads: int = 0,
                 providers: Sequence = ("CPUExecutionProvider",), in_flight: int | None = None):
        try:
            import ray
        except ImportError as e:
            raise ImportError("pipeline='ray' needs Ray: pip install 'edge-exporter[ray]'.") from e
        if not ray.is_initialized():
            ray.init()
        self._ray = ray
        self.plan = Stages(stages, outputs, [i["name"] for i in inputs] if inputs else None)
        gpus = ray.cluster_resources().get("GPU", 0)
        cuda = sum(stage["device"].startswith("cuda") for stage in stages)
        if cuda and gpus < len(stages):
            warnings.warn(f"The Ray cluster has {gpus:g} GPUs for {len(stages)} stages, {cuda} "
                          f"of them meant for CUDA; every stage runs on CPU.", RuntimeWarning,
                          stacklevel=4)
        actor = ray.remote(_StageWorker)
        on_gpus = [stage["device"].startswith("cuda") and gpus >= len(stages)
                   for stage in stages]
        # With threads 0 ("all cores") the stage actors on the CPU compute at the same time:
        # each takes a share of the cluster's CPUs, reserved for it in Ray, and runs that
        # many threads (as StagedSession's stages share a process's cores); all cores each
        # contended for them. An explicit count is every stage's, and one CPU stage keeps 0.
        self.cpus = 0
        on_cpu = on_gpus.count(False)
        if not threads and on_cpu >= 2:
            nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            self.cpus = actor_cpus(on_cpu, nodes, ray.available_resources().get("CPU", 0))
        # What the actors hold goes back at close(), or when this session is collected
        # unclosed: a placement group outlives the object that made it, and a Model dropped
        # without close() kept its GPUs reserved for as long as the cluster ran (the next
        # load waited 10 s, then ran on the CPU).
        self._held = {"actors": [], "group": None}
        self._release = weakref.finalize(self, _release, ray, self._held)
        self._release.atexit = False   # (Ray's own shutdown frees a driver's actors)
        self._directory = Path(directory)
        self._lock = threading.Lock()
        self._calls = 0   # under way (in any thread): close() lets them end as they would
        self._closing = False
        # On failure what was reserved and the actors started go back here (each actor may
        # hold a GPU).
        try:
            self._start(actor, directory, stages, outputs, providers, on_gpus, threads)
        except BaseException:
            self.close()
            raise
        self.in_flight = in_flight or 2 * len(stages)
        self._describe(inputs)

    @property
    def actors(self) -> list:
        return self._held["actors"]

    @property
    def _group(self):
        return self._held["group"]

    @_group.setter
    def _group(self, group) -> None:
        self._held["group"] = group

    def _submit(self, feeds: dict):
        ref = self._ray.put(dict(feeds))
        for actor in self.actors:
            ref = actor.step.remote(ref)
        return ref

    @contextlib.contextmanager
    def _call(self) -> Iterator[None]:
        """A call under way: the actors stay until the last one ends, even after close()
        (which killed them at once, and a call in another thread died in Ray's
        ActorDiedError)."""
        with self._lock:
            if self._closing:
                raise ValueError(f"The model of {self._directory} is closed (Model.close()); "
                                 f"load the bundle again to use it.")
            self._calls += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls -= 1
                last = self._closing and not self._calls
            if last:
                self._release()

    def run(self, output_names, feeds: dict) -> list:
        with self._call():
            env = self._ray.get(self._submit(feeds))
        return [env[n] for n in (output_names or self.plan.final)]

    def run_stream(self, feeds: Iterable[dict], output_names=None) -> Iterator[list]:
        """Outputs per batch, in order; up to `in_flight` batches in the pipeline at once."""
        names = list(output_names or self.plan.final)
        pending: deque = deque()
        with self._call():
            for item in feeds:
                pending.append(self._submit(item))
                if len(pending) >= self.in_flight:
                    env = self._ray.get(pending.popleft())
                    yield [env[n] for n in names]
            while pending:
                env = self._ray.get(pending.popleft())
                yield [env[n] for n in names]

    def _start(self, actor, directory, stages, outputs, providers, on_gpus, threads) -> None:
        """The stage actors, each graph checked against the plan."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self._ray
        # What the actors hold (a GPU each; a CPU stage its share, if any), reserved at once.
        holds = [{"GPU": 1} if on_gpu else {"CPU": self.cpus} if self.cpus else None
                 for on_gpu in on_gpus]
        refused = None   # what Ray did not grant in time, in words
        if any(holds):
            self._group = self._reserve([h for h in holds if h])
            if self._group is None:   # not granted: every stage on the CPU, nothing held
                gpus, share = on_gpus.count(True), self.cpus
                refused = " and ".join([f"{gpus} GPU{'s' * (gpus > 1)}"] * bool(gpus)
                                       + [f"{len(stages) - gpus} x {share} CPUs"] * bool(share))
                on_gpus, holds, self.cpus = [False] * len(stages), [None] * len(stages), 0
        on_cpu = on_gpus.count(False)
        self.threads = [threads if on_gpu or threads or on_cpu < 2 else self.cpus or 1
                        for on_gpu in on_gpus]
        if refused:
            warnings.warn(f"Ray did not grant the stage actors {refused} within "
                          f"{RESERVE_SECONDS:g} s (another job holds them); every stage runs "
                          f"on the CPU with nothing reserved, "
                          f"{_threads_each(self.threads[0])}.", RuntimeWarning, stacklevel=5)
        bundle = 0
        for i, (stage, on_gpu, hold) in enumerate(zip(stages, on_gpus, holds, strict=True)):
            # One GPU per stage actor; Ray picks the node and sets CUDA_VISIBLE_DEVICES, so
            # inside the actor the GPU is device 0. (An actor asks for a CPU to be scheduled
            # unless told otherwise, which its GPU's part of the group does not have.)
            device = "cuda:0" if on_gpu else "cpu"
            options = {"num_gpus": 1, "num_cpus": 0} if on_gpu else {"num_cpus": self.cpus}
            if hold:   # its part of the group reserved above
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    self._group, placement_group_bundle_index=bundle)
                bundle += 1
            graph = (Path(directory) / stage["file"]).read_bytes()
            # a stage over 2 GB keeps its weights in files beside it: sent along too
            data = {name: (Path(directory) / name).read_bytes()
                    for name in stage.get("external_data", ())}
            self.actors.append(actor.options(**options).remote(
                i, graph, stages, list(outputs), self.threads[i],
                device_providers(device, providers), data))
        # Every actor's graph checked against the plan now, as StagedSession checks its
        # sessions: a manifest edited apart from its stage files, or a graph an actor could
        # not load, failed only at the first call, deep in a remote traceback.
        checked = []
        for i, started in enumerate(self.actors):
            try:
                checked.append(ray.get(started.check.remote()))
            except ray.exceptions.RayTaskError as e:
                raise e.cause from None
            except ray.exceptions.RayActorError as e:   # its __init__ failed
                reason = str(e).strip().splitlines()[-1]
                raise BundleError(f"{Path(directory) / stages[i]['file']}: the Ray actor "
                                  f"of stage {i} could not load it: {reason}") from e
        self.providers = [taken for _, taken in checked]   # what each stage runs on
        say_fallbacks(checked)

    def _reserve(self, holds: list[dict]):
        """A placement group of `holds` (one part per actor: {"GPU": 1} or {"CPU": share}),
        or None where Ray cannot grant it within RESERVE_SECONDS. The GPUs were counted in
        the cluster and the CPU share worked out from the CPUs free a moment ago; another job
        may hold them, or have taken them since, and then Ray held the actors back until
        they came free, for ever on a busy cluster: the constructor hung on its first call
        to them. A placement group is granted whole or not at all."""
        from ray.util import placement_group, remove_placement_group

        group = placement_group(holds, strategy="PACK")
        try:
            self._ray.get(group.ready(), timeout=RESERVE_SECONDS)
        except self._ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            return None
        return group

    def close(self) -> None:
        """Start no more calls, and stop the actors and give back what they held once the
        calls under way have ended (now, where none is)."""
        with self._lock:
            self._closing = True
            idle = not self._calls
        if idle:
            self._release()


def _release(ray, held: dict) -> None:
    """Stop the stage actors and remove their placement group (the GPUs and CPU shares they
    held go back): at close(), or when their session is collected unclosed."""
    actors, held["actors"] = held["actors"], []
    for actor in actors:
        ray.kill(actor)
    group, held["group"] = held["group"], None
    if group is not None:
        from ray.util import remove_placement_group

        remove_placement_group(group)
