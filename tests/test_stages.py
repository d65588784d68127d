"""Pipeline stages: the staged bundle gives exactly the single graph's outputs on CPU, in
threads and as Ray actors; bad stage counts are clear errors."""

from __future__ import annotations

import importlib.util
import json
import warnings

import numpy as np
import onnx
import pytest

import runtime
from exporter.partition import restage, split


@pytest.fixture(scope="module")
def single(minilm_bundle, eval_texts):
    model = runtime.load(minilm_bundle)
    return model.embed(eval_texts, batch_size=16)


@pytest.mark.parametrize("stages", [2, 4])
def test_staged_bundle_equals_single_graph(minilm_bundle, eval_texts, single, stages, tmp_path):
    path = restage(minilm_bundle, stages, tmp_path / f"minilm-{stages}")
    manifest = json.loads((path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["stages"]] == [f"stage{i}.onnx" for i in range(stages)]
    assert not (path / "model.onnx").exists()
    for stage in manifest["stages"]:
        assert stage["device"] == "cpu" and stage["inputs"] and stage["outputs"]
    # every tensor a stage reads is a graph input or made by an earlier stage
    available = {i["name"] for i in manifest["inputs"]}
    for stage in manifest["stages"]:
        assert {t["name"] for t in stage["inputs"]} <= available
        available |= {t["name"] for t in stage["outputs"]}
    staged = runtime.load(path)
    got = staged.embed(eval_texts, batch_size=16)   # 13 batches through the pipeline
    np.testing.assert_array_equal(got, single)


def test_cuda_stage_devices_fall_back_to_cpu(minilm_bundle, eval_texts, single, tmp_path,
                                             cuda_fallback_warning):
    path = restage(minilm_bundle, 2, tmp_path / "staged")
    manifest = json.loads((path / "manifest.json").read_text())
    with cuda_fallback_warning:
        model = runtime.load(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert [s["device"] for s in manifest["stages"]] == ["cpu", "cpu"]  # arm-cpu target
    np.testing.assert_array_equal(model.embed(eval_texts[:20], batch_size=16),
                                  single[:20])


def test_restage_leaves_out_the_external_data_its_stages_do_not_read(minilm_bundle, eval_texts,
                                                                     single, tmp_path):
    """The stage graphs hold their weights inline; restage still copied the source graph's
    external-data file into the staged bundle (a second copy of every weight, read by no
    graph)."""
    import shutil

    from runtime.bundle import sha256_of

    source = tmp_path / "external"
    shutil.copytree(minilm_bundle, source)
    onnx.save(onnx.load(source / "model.onnx"), source / "model.onnx",
              save_as_external_data=True, location="model.onnx.data")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["files"] = [{"path": p.name, "sha256": sha256_of(p), "bytes": p.stat().st_size}
                         for p in sorted(source.iterdir()) if p.name != "manifest.json"]
    (source / "manifest.json").write_text(json.dumps(manifest))
    assert runtime.load(source)   # a sound bundle, its weights in model.onnx.data

    path = restage(source, 2, tmp_path / "staged")
    files = [f["path"] for f in json.loads((path / "manifest.json").read_text())["files"]]
    assert "model.onnx.data" not in files and not (path / "model.onnx.data").exists()
    assert {"stage0.onnx", "stage1.onnx", "tokenizer.json"} <= set(files)
    got = runtime.load(path).embed(eval_texts[:20], batch_size=16)   # verified, and the same
    np.testing.assert_array_equal(got, single[:20])


def test_restage_keeps_the_folders_of_the_files_its_manifest_lists(minilm_bundle, eval_texts,
                                                                   single, tmp_path):
    """A listed file in a folder (assets/notes/readme.txt) was copied to a folder restage had
    not made (FileNotFoundError), and the staged manifest listed only the top-level files;
    a graph in a folder (onnx/model.onnx) had its external data copied along."""
    import shutil

    from runtime.bundle import sha256_of

    source = tmp_path / "folders"
    shutil.copytree(minilm_bundle, source)
    (source / "onnx").mkdir()
    onnx.save(onnx.load(source / "model.onnx"), source / "onnx" / "model.onnx",
              save_as_external_data=True, location="model.onnx.data")
    (source / "model.onnx").unlink()
    (source / "assets" / "notes").mkdir(parents=True)
    (source / "assets" / "notes" / "readme.txt").write_text("kitchen lights: zone 2\n")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["model_file"] = "onnx/model.onnx"
    manifest["files"] = [{"path": p.relative_to(source).as_posix(), "sha256": sha256_of(p),
                          "bytes": p.stat().st_size}
                         for p in sorted(source.rglob("*"))
                         if p.is_file() and p.name != "manifest.json"]
    (source / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(runtime.load(source).embed(eval_texts[:20], batch_size=16),
                                  single[:20])   # a sound bundle

    path = restage(source, 2, tmp_path / "staged")
    files = [f["path"] for f in json.loads((path / "manifest.json").read_text())["files"]]
    assert "assets/notes/readme.txt" in files
    assert (path / "assets" / "notes" / "readme.txt").read_text() == "kitchen lights: zone 2\n"
    assert not (path / "onnx").exists() and not any(f.startswith("onnx/") for f in files)
    got = runtime.load(path).embed(eval_texts[:20], batch_size=16)   # verified, and the same
    np.testing.assert_array_equal(got, single[:20])


def _external_stages(path):
    """The stage records of bundle `path` and its manifest's files, checked: every stage
    keeps its weights in stageN.onnx.data, and the manifest lists and hashes that file."""
    from runtime.bundle import sha256_of

    manifest = json.loads((path / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    for stage in manifest["stages"]:
        assert stage["external_data"] == [stage["file"] + ".data"]
        data = path / stage["external_data"][0]
        assert files[data.name]["sha256"] == sha256_of(data)
        assert files[data.name]["bytes"] == data.stat().st_size > (path / stage["file"]).stat(
        ).st_size
    return manifest


def test_stages_over_the_size_limit_keep_their_weights_in_external_data(
        minilm_bundle, eval_texts, single, tmp_path, monkeypatch, refused_when_flipped):
    """A stage over protobuf's 2 GB could not be saved (onnx.save raised), so a model that
    large could not be cut into stages. Over graph_file.INLINE_LIMIT (lowered here to 1 MB:
    MiniLM's int8 stages are ~11 MB) a stage's weights go to stageN.onnx.data beside it,
    which the manifest lists and the runtime verifies."""
    import shutil

    from exporter import graph_file

    monkeypatch.setattr(graph_file, "INLINE_LIMIT", 1 << 20)
    path = restage(minilm_bundle, 2, tmp_path / "staged")
    _external_stages(path)
    got = runtime.load(path).embed(eval_texts, batch_size=16)
    np.testing.assert_array_equal(got, single)
    broken = refused_when_flipped(path, "stage1.onnx.data", tmp_path, 100)
    # a manifest whose stage names external data it does not list is refused at load
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "stage0.onnx.data"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(path / "stage1.onnx.data", broken / "stage1.onnx.data")
    with pytest.raises(runtime.BundleError, match=r"'stage0\.onnx\.data' is not in its "
                                                  r"'files' list"):
        runtime.load(broken)
    manifest["stages"][0]["external_data"] = 7   # not a list: refused, not a TypeError
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.BundleError, match="'external_data' must be a list"):
        runtime.load(broken)


def test_an_export_bundles_the_external_data_of_its_stages(eval_texts, tmp_path,
                                                           export_over_the_size_limit):
    """The export moved stage0.onnx ... into the bundle and left their external data behind.
    Every graph is over the size limit (export_over_the_size_limit), the single graph the
    stages are cut from too."""
    # calibrated and scored on fewer texts than the profile's (the files are the point)
    path, _ = export_over_the_size_limit(
        "minilm", target="arm-cpu", stages=2, output=tmp_path / "staged",
        calibration=eval_texts[:48], evaluation=eval_texts[48:96])
    _external_stages(path)
    # the export ran the stages against its single graph: equal
    report = json.loads((path / "report.json").read_text())
    assert report["partition"]["max_abs_diff_vs_single_graph"] == 0.0
    assert runtime.load(path).embed(eval_texts[:20], batch_size=16).shape == (20, 384)
    # the size reported (and held to max_model_mb) is the stage files', weights included,
    # not the single graph's they were cut from
    manifest = json.loads((path / "manifest.json").read_text())
    shipped = sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("stage"))
    assert report["validation"]["size_bytes"]["bundle_model"] == shipped


def test_a_failing_feed_reaches_the_caller_instead_of_hanging(minilm_bundle, tmp_path):
    session = runtime.load(restage(minilm_bundle, 2, tmp_path / "staged")).session
    feed = {"input_ids": np.array([[101, 7592, 102]]), "attention_mask": np.ones((1, 3), int),
            "token_type_ids": np.zeros((1, 3), int)}
    feed = {i.name: feed[i.name] for i in session.get_inputs()}

    def feeds():
        yield feed
        raise OSError("the caller's data source failed")

    stream = session.run_stream(feeds())
    assert len(next(stream)) == 1
    with pytest.raises(OSError, match="data source failed"):
        next(stream)


def test_a_stream_from_a_live_source_stops_at_once(minilm_bundle, tmp_path):
    # close() (and a stage's error) waited until the caller's source gave its next item:
    # forever, for a queue nobody fills any more.
    import queue
    import threading
    import time

    session = runtime.load(restage(minilm_bundle, 2, tmp_path / "staged")).session
    feed = {"input_ids": np.array([[101, 7592, 102]]), "attention_mask": np.ones((1, 3), int),
            "token_type_ids": np.zeros((1, 3), int)}
    feed = {i.name: feed[i.name] for i in session.get_inputs()}
    sources = [queue.Queue(), queue.Queue()]

    def live(source):
        while True:
            yield source.get()

    before = threading.active_count()
    sources[0].put(feed)
    stream = session.run_stream(live(sources[0]))
    assert len(next(stream)) == 1
    started = time.perf_counter()
    stream.close()
    assert time.perf_counter() - started < 2
    sources[1].put({**feed, "input_ids": feed["input_ids"].astype(np.float32)})   # bad
    stream = session.run_stream(live(sources[1]))
    started = time.perf_counter()
    with pytest.raises(Exception, match="Unexpected input data type"):
        next(stream)
    assert time.perf_counter() - started < 5
    for source in sources:   # a feed blocked in its source leaves once that gives an item
        source.put(feed)
    deadline = time.perf_counter() + 10
    while threading.active_count() > before and time.perf_counter() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_stage_devices_keep_the_callers_provider_options():
    from runtime.stages import device_providers

    given = [("CUDAExecutionProvider", {"gpu_mem_limit": 1 << 30}), "CPUExecutionProvider"]
    assert device_providers("cuda:1", given) == [
        ("CUDAExecutionProvider", {"gpu_mem_limit": 1 << 30, "device_id": 1}),
        "CPUExecutionProvider"]
    assert given[0][1] == {"gpu_mem_limit": 1 << 30}   # the caller's dict is not changed


@pytest.mark.parametrize("visible", [0, 1, 2])
def test_stages_on_gpus_this_process_does_not_see_run_on_the_cpu_and_say_so(
        tmp_path, monkeypatch, visible):
    """Stage i of a GPU target asks for cuda:i. With fewer GPUs visible, onnxruntime refused
    the device_id ("Invalid device ID: 1, must be between 0 (inclusive) and 1 (exclusive)"),
    printed "EP Error" to stdout and ran the stage on the CPU: no warning, and a CLI's stdout
    got its banner. (onnxruntime-gpu and the GPUs are faked here.)"""
    import warnings

    import onnxruntime as ort

    import runtime.model
    import runtime.stages
    from exporter.partition import write_stages
    from runtime.stages import StagedSession

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    records = write_stages(_chain_model(), 2, tmp_path, gpu)
    assert [r["device"] for r in records] == ["cuda:0", "cuda:1"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    monkeypatch.setattr(runtime.stages, "visible_gpus", lambda: visible, raising=False)
    asked, ort_session = [], runtime.model.ort_session

    def cpu_session(path, *, providers, **kwargs):   # records the devices; runs on the CPU
        asked.append(providers[0])
        return ort_session(path, **kwargs)

    monkeypatch.setattr(runtime.model, "ort_session", cpu_session)
    cpu = {0: [0, 1], 1: [1], 2: []}[visible]
    if cpu:
        which = rf"stages? {', '.join(map(str, cpu))} runs? on the CPU"
        with pytest.warns(RuntimeWarning, match=rf"2 pipeline stages want a GPU \(cuda:0, "
                                                rf"cuda:1\) and this process sees {visible}: "
                                                rf"{which}\. Make 2 GPUs visible"):
            session = StagedSession(tmp_path, records, outputs=["y"], threads=1, providers=gpu)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            session = StagedSession(tmp_path, records, outputs=["y"], threads=1, providers=gpu)
    on_gpu = [("CUDAExecutionProvider", {"device_id": i}) for i in range(2)]
    assert asked == ["CPUExecutionProvider" if i in cpu else on_gpu[i] for i in range(2)]
    assert session.devices == ["cpu" if i in cpu else f"cuda:{i}" for i in range(2)]


@pytest.mark.parametrize("threads, cores, gpus, expected", [
    (0, 2, 0, [1, 1]), (0, 8, 0, [4, 4]), (0, 1, 0, [1, 1]), (3, 2, 0, [3, 3]),
    (0, 8, 1, [0, 0]), (0, 8, 2, [0, 0])])   # one stage on the CPU keeps all its cores
def test_stages_on_the_cpu_share_its_cores(tmp_path, monkeypatch, threads, cores, gpus,
                                           expected):
    """threads 0 gave every CPU stage all the cores, and the pipeline's stages compute at the
    same time: 2 stages x 2 threads on 2 cores embedded 1,000 MiniLM texts in 1.12 s, 2 x 1
    in 0.62 s. A stage on a GPU keeps 0; an explicit count is each stage's."""
    import onnxruntime as ort

    import runtime.model
    import runtime.stages
    from exporter.partition import write_stages
    from runtime.stages import StagedSession

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    records = write_stages(_chain_model(), 2, tmp_path, gpu)
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    monkeypatch.setattr(runtime.stages, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(runtime.model, "usable_cores", lambda: cores)
    given, ort_session = [], runtime.model.ort_session

    def cpu_session(path, *, threads, providers, **kwargs):   # runs every stage on the CPU
        given.append(threads)
        return ort_session(path, threads=threads, **kwargs)

    monkeypatch.setattr(runtime.model, "ort_session", cpu_session)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the missing GPUs, tested above
        session = StagedSession(tmp_path, records, outputs=["y"], threads=threads,
                                providers=gpu)
    assert given == session.threads == expected


def test_stage_errors_are_clear(minilm_bundle, tmp_path):
    model = onnx.load(minilm_bundle / "model.onnx")
    with pytest.raises(ValueError, match=r"stages must be an int >= 1, got True"):
        split(model, True)
    with pytest.raises(ValueError, match=r"stages must be an int >= 1, got 0"):
        split(model, 0)
    with pytest.raises(ValueError, match=r"Cannot split the graph into 100000 stages"):
        split(model, 100_000)
    staged = restage(minilm_bundle, 2, tmp_path / "staged")
    with pytest.raises(ValueError, match="already cut into 2 stages"):
        restage(staged, 2, tmp_path / "again")


def test_export_refuses_more_stages_than_layers():
    from exporter import export

    with pytest.raises(ValueError, match=r"6-layer model into 7 pipeline stages"):
        export("minilm", target="x86-server", stages=7)
    from exporter import Compression

    for drop in (3, (0, 2, 4)):   # the count left after dropping, before any work
        with pytest.raises(ValueError, match=r"after --drop-layers removes 3 into 4 pipeline "
                                             r"stages.*at most 3 stages"):
            export("minilm", target="x86-server", stages=4,
                   compression=Compression(drop_layers=drop))
    with pytest.raises(ValueError, match="Dropping 6 of 6 layers would leave no layer"):
        export("minilm", target="x86-server", stages=2, compression=Compression(drop_layers=6))
    with pytest.raises(ValueError, match=r"stages must be an int >= 1 .*got 0"):
        export("minilm", target="x86-server", stages=0)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_actors_equal_single_graph(minilm_bundle, eval_texts, single, tmp_path):
    import ray

    path = restage(minilm_bundle, 2, tmp_path / "staged")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        model = runtime.load(path, pipeline="ray")
        assert type(model.session).__name__ == "RayStagedSession"
        assert model.session.providers == ["CPUExecutionProvider"] * 2   # what each runs on
        np.testing.assert_array_equal(model.embed(eval_texts, batch_size=16), single)
        # A GPU target's stages on a cluster with too few GPUs: all on CPU, and said so.
        manifest = json.loads((path / "manifest.json").read_text())
        for i, stage in enumerate(manifest["stages"]):
            stage["device"] = f"cuda:{i}"
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.warns(RuntimeWarning, match="has 0 GPUs for 2 stages, 2 of them meant "
                                                "for CUDA; every stage runs on CPU"):
            model = runtime.load(path, pipeline="ray")
        np.testing.assert_array_equal(model.embed(eval_texts[:20], batch_size=16), single[:20])
        # close() ends the stage actors (each holds a GPU on a cluster) there and then
        actors = list(model.session.actors)
        model.close()
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actors[0].step.remote({}), timeout=60)
    finally:
        ray.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_actors_get_the_external_data_of_their_stages(minilm_bundle, eval_texts, single,
                                                          tmp_path, monkeypatch):
    """An actor gets its stage's graph as bytes; the weights of a stage over 2 GB, in a file
    beside it, did not come along, and onnxruntime could not load the graph."""
    import ray

    from exporter import graph_file

    monkeypatch.setattr(graph_file, "INLINE_LIMIT", 1 << 20)
    path = restage(minilm_bundle, 2, tmp_path / "staged")
    _external_stages(path)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with runtime.load(path, pipeline="ray") as model:
            np.testing.assert_array_equal(model.embed(eval_texts[:20], batch_size=16),
                                          single[:20])
    finally:
        ray.shutdown()


@pytest.mark.parametrize("actors, nodes, free, expected", [
    (2, [2], 2, 1), (2, [8], 8, 4), (3, [8], 8, 2), (2, [8], 3, 1), (2, [1], 1, 0),
    (2, [4, 4], 8, 4), (2, [3, 1], 4, 1), (2, [3, 3], 6, 3), (2, [], 0, 0)])
def test_ray_cpu_stage_actors_share_the_cpus_that_fit_them(actors, nodes, free, expected):
    """An actor runs on one node: 2 actors of 2 CPUs do not fit on nodes of 3 and 1 CPUs
    (Ray would hold the second back for ever), nor more than the free CPUs in all."""
    from runtime.ray_stages import actor_cpus

    assert actor_cpus(actors, nodes, free) == expected


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_cpu_stage_actors_share_the_cores(tmp_path):
    """StagedSession's CPU stages share the process's cores (stage_threads); as Ray actors
    each stage took no CPU from Ray and ran a session of all cores (intra-op threads 0), so
    two stages on 2 cores contended for them."""
    import time

    import ray

    from exporter.partition import write_stages
    from runtime.ray_stages import RayStagedSession
    from runtime.stages import StagedSession

    records = write_stages(_chain_model(), 2, tmp_path, ["CPUExecutionProvider"])
    x = {"x": np.ones((2, 3), np.float32)}
    expected = StagedSession(tmp_path, records, outputs=["y"], threads=1).run(None, x)

    def intra_op_threads(worker):
        return worker.session.get_session_options().intra_op_num_threads

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for threads, split, free in ((0, [1, 1], 0), (3, [3, 3], 2)):
            session = RayStagedSession(tmp_path, records, outputs=["y"], threads=threads)
            try:
                assert [ray.get(a.__ray_call__.remote(intra_op_threads))
                        for a in session.actors] == split
                assert session.threads == split
                # the split CPUs are held for the actors in Ray; an explicit count takes none
                # (the CPUs of actors ended come back a moment after)
                deadline = time.monotonic() + 30
                while ray.available_resources().get("CPU", 0) != free \
                        and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert ray.available_resources().get("CPU", 0) == free
                np.testing.assert_array_equal(session.run(None, x)[0], expected[0])
            finally:
                session.close()
    finally:
        ray.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_stage_actors_end_after_the_calls_under_way_and_when_dropped(tmp_path):
    """close() killed the actors at once: a call under way in another thread died in Ray's
    ActorDiedError. A session dropped without close() kept its placement group, its CPUs
    (a cluster's GPUs) reserved for as long as Ray ran: the next load got none."""
    import gc
    import time

    import ray

    from exporter.partition import write_stages
    from runtime.ray_stages import RayStagedSession
    from runtime.stages import StagedSession

    records = write_stages(_chain_model(), 2, tmp_path, ["CPUExecutionProvider"])
    feeds = [{"x": np.full((2, 3), i, np.float32)} for i in range(6)]
    threaded = StagedSession(tmp_path, records, outputs=["y"], threads=1)
    assert threaded.providers == ["CPUExecutionProvider"] * 2   # what each stage runs on
    expected = [threaded.run(None, f)[0] for f in feeds]

    def free_cpus_become(count):
        deadline = time.monotonic() + 30   # (what ended actors held comes back a moment after)
        while ray.available_resources().get("CPU", 0) != count and time.monotonic() < deadline:
            time.sleep(0.1)
        return ray.available_resources().get("CPU", 0) == count

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        session = RayStagedSession(tmp_path, records, outputs=["y"], threads=0)
        assert free_cpus_become(0)   # each actor's share reserved
        stream = session.run_stream(iter(feeds))
        first = next(stream)   # a call under way
        session.close()
        rest = list(stream)    # ends as it would
        for got, want in zip([first, *rest], expected, strict=True):
            np.testing.assert_array_equal(got[0], want)
        assert free_cpus_become(2) and not session.actors
        with pytest.raises(ValueError, match="is closed"):
            session.run(None, feeds[0])
        session = RayStagedSession(tmp_path, records, outputs=["y"], threads=0)
        assert free_cpus_become(0)
        del session
        gc.collect()
        assert free_cpus_become(2)
    finally:
        ray.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_cpu_stage_actors_whose_cpus_were_taken_meanwhile_run_unreserved(tmp_path,
                                                                             monkeypatch):
    """The CPU stage actors' share comes from the CPUs Ray says are free, and another job
    may take them before the actors start. Ray then held the actors back until the CPUs came
    free (never, while that job ran) and the constructor hung on its first call to them.
    Now the share is reserved in one placement group, granted whole or not at all, and
    where Ray cannot grant it the actors run unreserved, on one thread each, with a
    warning."""

    import ray

    from exporter.partition import write_stages
    from runtime import ray_stages
    from runtime.ray_stages import RayStagedSession
    from runtime.stages import StagedSession

    records = write_stages(_chain_model(), 2, tmp_path, ["CPUExecutionProvider"])
    x = {"x": np.ones((2, 3), np.float32)}
    expected = StagedSession(tmp_path, records, outputs=["y"], threads=1).run(None, x)
    monkeypatch.setattr(ray_stages, "RESERVE_SECONDS", 2.0)

    class Other:   # the other job
        def ready(self) -> bool:
            return True

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        free = ray.available_resources()   # read, then the other job takes every CPU
        other = ray.remote(num_cpus=2)(Other).remote()
        ray.get(other.ready.remote())
        monkeypatch.setattr(ray, "available_resources", lambda: free)
        built = _started_in_time(lambda: RayStagedSession(tmp_path, records, outputs=["y"]),
                                 "CPUs taken meanwhile")
        session = built["session"]
        try:
            assert ("Ray did not grant the stage actors 2 x 1 CPUs within 2 s (another job "
                    "holds them); every stage runs on the CPU with nothing reserved, on 1 "
                    "thread each.") in built["warnings"], built
            assert session.cpus == 0 and session.threads == [1, 1]
            np.testing.assert_array_equal(session.run(None, x)[0], expected[0])
        finally:
            session.close()
        ray.kill(other)
    finally:
        ray.shutdown()


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_gpu_stage_actors_whose_gpus_another_job_holds_run_on_the_cpu(tmp_path):
    """Stage actors on GPUs each hold one of the cluster's GPUs (its own: Ray sets its
    CUDA_VISIBLE_DEVICES). The GPUs were counted in the cluster, not among the free ones:
    while another job held them, Ray held the actors back and the constructor hung. Now
    they are reserved in one placement group, and where Ray cannot grant it every stage
    runs on the CPU, with a warning. (A Ray told it has 2 GPUs; onnxruntime runs on the
    CPU either way here.)"""

    import ray

    from exporter.partition import write_stages
    from runtime import ray_stages
    from runtime.ray_stages import RayStagedSession
    from runtime.stages import StagedSession

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    records = write_stages(_chain_model(), 2, tmp_path, gpu)
    assert [r["device"] for r in records] == ["cuda:0", "cuda:1"]
    x = {"x": np.ones((2, 3), np.float32)}
    expected = StagedSession(tmp_path, records, outputs=["y"], threads=1).run(None, x)

    def start() -> dict:
        return _started_in_time(lambda: RayStagedSession(tmp_path, records, outputs=["y"],
                                                         threads=1, providers=gpu),
                                "GPUs held elsewhere")

    class Other:   # the other job
        def ready(self) -> bool:
            return True

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        session = start()["session"]
        try:   # each actor holds a GPU of its own
            assert sorted(ray.get(a.__ray_call__.remote(lambda _: ray.get_gpu_ids()))
                          for a in session.actors) == [[0], [1]]
            assert ray.available_resources().get("GPU", 0) == 0
            np.testing.assert_array_equal(session.run(None, x)[0], expected[0])
        finally:
            session.close()
        other = ray.remote(num_gpus=2, num_cpus=0)(Other).remote()
        ray.get(other.ready.remote(), timeout=60)   # the GPUs came back, and it holds them
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ray_stages, "RESERVE_SECONDS", 2.0)
            built = start()
        session = built["session"]
        try:
            assert ("Ray did not grant the stage actors 2 GPUs within 2 s (another job holds "
                    "them); every stage runs on the CPU with nothing reserved, on 1 thread "
                    "each.") in built["warnings"], built["warnings"]
            assert ray.get([a.__ray_call__.remote(lambda _: ray.get_gpu_ids())
                            for a in session.actors]) == [[], []]
            np.testing.assert_array_equal(session.run(None, x)[0], expected[0])
        finally:
            session.close()
        ray.kill(other)
    finally:
        ray.shutdown()


def _started_in_time(make, waiting_for: str) -> dict:
    """`make()` (a RayStagedSession) in a thread, which must start within 90 s and not
    raise: {"session": what it made, "warnings": the warnings' messages}."""
    import threading
    import warnings

    built: dict = {}

    def build() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                built["session"] = make()
            except BaseException as e:
                built["error"] = e
        built["warnings"] = [str(w.message) for w in caught]

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    worker.join(90)
    assert not worker.is_alive(), f"RayStagedSession hung waiting for {waiting_for}"
    assert "error" not in built, built["error"]
    return built


def _chain_model(layers: int = 4):
    """x (batch, seq) -> MatMul, LayerNorm -> h0, then `layers - 1` x (MatMul, LayerNorm),
    the last LayerNorm's input a residual Add of h0 (which crosses every cut) -> y (batch,
    seq, 8)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden = 8
    inits = [numpy_helper.from_array(rng.normal(size=(1, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=(hidden, hidden)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "beta"),
             numpy_helper.from_array(np.array([2], np.int64), "axis")]
    norm = ("gamma", "beta")
    nodes = [helper.make_node("Unsqueeze", ["x", "axis"], ["x3"]),
             helper.make_node("MatMul", ["x3", "w1"], ["a0"]),
             helper.make_node("LayerNormalization", ["a0", *norm], ["h0"])]
    for i in range(1, layers - 1):
        nodes += [helper.make_node("MatMul", [f"h{i - 1}", "w"], [f"a{i}"]),
                  helper.make_node("LayerNormalization", [f"a{i}", *norm], [f"h{i}"])]
    last = layers - 1
    nodes += [helper.make_node("MatMul", [f"h{last - 1}", "w"], [f"a{last}"]),
              helper.make_node("Add", [f"a{last}", "h0"], ["s"]),
              helper.make_node("LayerNormalization", ["s", *norm], ["y"])]
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_stage_io_declares_what_the_whole_graph_infers(tmp_path):
    """A residual Add whose other input crosses a stage boundary, then LayerNorm: with the
    hidden size known the whole graph fuses them into SkipLayerNormalization. Declared by
    rank only, the stage lost that size, did not fuse, and rounded differently (4.8e-7)."""
    from exporter.partition import write_stages
    from runtime.model import ort_session
    from runtime.stages import StagedSession

    rng = np.random.default_rng(0)
    model = _chain_model()
    x = rng.normal(size=(3, 5)).astype(np.float32)
    expected = ort_session(model.SerializeToString(), threads=1).run(None, {"x": x})[0]
    for count in (2, 3):
        out = tmp_path / str(count)
        out.mkdir()
        records = write_stages(model, count, out, ["CPUExecutionProvider"])
        got = StagedSession(out, records, outputs=["y"], threads=1).run(None, {"x": x})[0]
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("edit", ["input renamed", "stages reversed", "last stage dropped",
                                  "output renamed", "file swapped", "device not a string",
                                  "no outputs", "an input no stage reads"])
def test_a_stage_plan_that_does_not_fit_its_graphs_is_refused_at_load(tmp_path, edit):
    """A manifest whose stage plan does not fit the stage graphs loaded fine and failed at
    the first call with a KeyError, an onnxruntime error or an AttributeError."""
    import copy

    from exporter.partition import write_stages
    from runtime.bundle import BundleError
    from runtime.stages import StagedSession

    records = write_stages(_chain_model(), 3, tmp_path, ["CPUExecutionProvider"])
    x = np.ones((2, 3), np.float32)
    assert StagedSession(tmp_path, records, outputs=["y"], threads=1).run(None, {"x": x})
    plan, outputs, inputs = copy.deepcopy(records), ["y"], None
    if edit == "input renamed":
        plan[1]["inputs"][0]["name"] = "nonexistent"
    elif edit == "stages reversed":
        plan.reverse()
    elif edit == "last stage dropped":
        plan.pop()
    elif edit == "output renamed":
        outputs = ["nope"]
    elif edit == "file swapped":
        plan[1]["file"] = plan[2]["file"]
    elif edit == "no outputs":   # passed verify, then IndexError at the first embed()
        outputs = []
    elif edit == "an input no stage reads":   # passed verify, then AssertionError in pad_batch
        inputs = [{"name": "x"}, {"name": "position_ids"}]
    else:
        plan[1]["device"] = 1
    with pytest.raises(BundleError, match=r"manifest\.json: (stage \d|the graph (in|out)puts"
                                          r"|'outputs' names no graph output)"):
        StagedSession(tmp_path, plan, outputs=outputs, inputs=inputs, threads=1)


def test_staged_session_names_every_graph_input_without_a_manifest(tmp_path):
    """Without `inputs`, get_inputs() listed stage 0's inputs only: a graph input that a
    later stage reads first was missing, and feeds built from it failed in that stage."""
    from onnx import TensorProto, helper

    from exporter.partition import write_stages
    from runtime.stages import StagedSession

    model = _chain_model()
    model.graph.input.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT,
                                                           ["batch", "seq"]))
    model.graph.node[-1].input[0] = "t"   # y = LayerNorm(s + bias): bias read at the end
    model.graph.node.insert(len(model.graph.node) - 1, helper.make_node(
        "Unsqueeze", ["bias", "axis"], ["bias3"], name="bias_unsqueeze"))
    model.graph.node.insert(len(model.graph.node) - 1,
                            helper.make_node("Add", ["s", "bias3"], ["t"], name="bias_add"))
    records = write_stages(model, 2, tmp_path, ["CPUExecutionProvider"])
    assert "bias" not in [t["name"] for t in records[0]["inputs"]]
    session = StagedSession(tmp_path, records, outputs=["y"], threads=1)
    assert [i.name for i in session.get_inputs()] == ["x", "bias"]


def _tiny_bundle(directory, model, manifest: dict | None = None) -> None:
    """A single-graph bundle around `model`: just what restage and Bundle.open read, and
    `manifest`'s entries ({"model": {"layers": 2}})."""
    from runtime.bundle import sha256_of

    directory.mkdir()
    onnx.save(model, directory / "model.onnx")
    (directory / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0}}}')
    files = [{"path": p.name, "sha256": sha256_of(p), "bytes": p.stat().st_size}
             for p in sorted(directory.iterdir())]
    (directory / "manifest.json").write_text(json.dumps({
        "format_version": 1, "name": directory.name, "task": "feature-extraction",
        "opset": 19, "model_file": "model.onnx", "files": files,
        "target": {"runtime": {"execution_providers": ["CPUExecutionProvider"]}},
        **(manifest or {})}))


def test_restage_refuses_a_damaged_source_bundle(tmp_path):
    """restage copied the source's files and hashed them afresh: a bundle that runtime.load
    refuses (a file modified after export) came out as one that verifies."""
    from runtime.bundle import Bundle, BundleError

    _tiny_bundle(tmp_path / "single", _chain_model())
    Bundle.open(restage(tmp_path / "single", 2, tmp_path / "staged"))   # a sound one restages
    (tmp_path / "single" / "tokenizer.json").write_text('{"model": {"vocab": {"b": 0}}}')
    with pytest.raises(BundleError, match=r"tokenizer\.json: sha256 does not match"):
        restage(tmp_path / "single", 2, tmp_path / "staged2")
    assert not (tmp_path / "staged2").exists()


def test_restage_refuses_to_write_over_its_source(tmp_path):
    """restage(b, n, b) replaced the single-graph bundle with its stages."""
    _tiny_bundle(tmp_path / "single", _chain_model())
    with pytest.raises(ValueError, match="other than the source bundle itself"):
        restage(tmp_path / "single", 2, tmp_path / "single")
    assert (tmp_path / "single" / "model.onnx").is_file()


@pytest.mark.parametrize("record", [{"layers": 2},
                                    {"layers": 6, "layers_after_compression": 2}])
def test_restage_refuses_more_stages_than_layers(tmp_path, record):
    """export refused 7 stages of a 6-layer model; restage cut MiniLM into 7 stages (22,
    16, 16, 16, 16, 13 and 12 nodes), some holding part of a layer. Refused before anything
    is written."""
    from runtime.bundle import Bundle

    _tiny_bundle(tmp_path / "single", _chain_model(layers=2), {"model": record})
    Bundle.open(restage(tmp_path / "single", 2, tmp_path / "two"))   # one layer each
    with pytest.raises(ValueError, match=r"2-layer model in .*single into 3 pipeline "
                                         r"stages: a stage needs at least one layer.*; "
                                         r"use at most 2 stages"):
        restage(tmp_path / "single", 3, tmp_path / "three")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["single", "two"]


def test_stage_weight_bytes_are_what_each_stage_holds(tmp_path):
    """A constant read in several stages is copied into each; the manifest counted it in the
    first stage only (here: 0 bytes and a 0% weight share for a stage holding a matrix)."""
    from onnx import numpy_helper

    from exporter.partition import write_stages

    records = write_stages(_chain_model(), 3, tmp_path, ["CPUExecutionProvider"])
    for record in records:
        held = onnx.load(tmp_path / record["file"]).graph.initializer
        assert record["weight_bytes"] == sum(numpy_helper.to_array(t).nbytes for t in held)
        assert record["share"]["weights"] > 0


def test_a_single_batch_runs_the_stages_in_turn(tmp_path, monkeypatch):
    """One batch has nothing to overlap with; through the thread pipeline (a thread per
    stage, started per call) it took about twice the time of the stages run in turn
    (MiniLM, 2 and 6 stages, batch 1: 3.0 vs 1.7 ms, 5.5 vs 2.7 ms)."""
    from exporter.partition import write_stages
    from runtime.stages import StagedSession, run_batches

    records = write_stages(_chain_model(), 2, tmp_path, ["CPUExecutionProvider"])
    session = StagedSession(tmp_path, records, outputs=["y"], threads=1)
    x = {"x": np.ones((2, 3), np.float32)}
    expected = session.run(None, x)

    def no_threads(*args, **kwargs):
        raise AssertionError("a single batch went through the thread pipeline")

    monkeypatch.setattr(session, "run_stream", no_threads)
    (got,) = list(run_batches(session, [x]))
    np.testing.assert_array_equal(got[0], expected[0])


def test_the_report_says_the_bundle_is_staged_and_what_was_timed():
    """report.md of a staged export said nothing about its stages, and its 'bundle' latency,
    size and peak RSS (the single graph's, before cutting) read as the staged bundle's."""
    from exporter.report import render_markdown

    stage = {"device": "cuda:0", "nodes": 47, "weight_bytes": 16_271_168,
             "flops_per_token": 1, "share": {"weights": 0.6914, "flops": 0.3333}}
    text = render_markdown({
        "name": "minilm-x86-server", "task": "feature-extraction", "target": "x86-server",
        "budget": "cosine>=0.995", "partition": {
            "stages": 2, "max_abs_diff_vs_single_graph": 0.0, "checked_texts": 32,
            "per_stage": [{"file": "stage0.onnx", **stage},
                          {"file": "stage1.onnx", **stage, "device": "cuda:1"}]}})
    assert "## Pipeline stages: 2" in text
    assert "peak RSS above are the single graph's" in text
    assert "| stage1.onnx | cuda:1 | 47 | 16.27 | 69% | 33% |" in text


def test_an_embedding_table_does_not_weigh_like_the_layers_it_displaces(tmp_path):
    """A Gather reads one row of its table per token. Counted whole, MiniLM's int8 token
    table (half its weight bytes) put 2 of 6 layers in the first of 2 stages and 4 in the
    second, which took twice as long (17.6 against 8.5 ms per batch of 8 on CPU)."""
    from onnx import TensorProto, helper, numpy_helper

    from exporter.partition import split

    rng = np.random.default_rng(0)
    hidden, vocab, layers = 8, 4096, 4
    inits = [numpy_helper.from_array(rng.normal(size=(vocab, hidden)).astype(np.float32),
                                     "table"),
             numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("LayerNormalization", ["e", "gamma", "beta"], ["h0"])]
    for i in range(1, layers + 1):
        inits.append(numpy_helper.from_array(
            rng.normal(size=(hidden, hidden)).astype(np.float32), f"w{i}"))
        nodes += [helper.make_node("MatMul", [f"h{i - 1}", f"w{i}"], [f"a{i}"]),
                  helper.make_node("LayerNormalization", [f"a{i}", "gamma", "beta"], [f"h{i}"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info(f"h{layers}", TensorProto.FLOAT, ["b", "s", hidden])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    matmuls = [sum(n.op_type == "MatMul" for n in s.nodes) for s in split(model, 2)]
    assert matmuls == [2, 2]


def test_fused_attention_counts_its_query_key_value_flops():
    """x86-server's int8 MiniLM runs its query/key/value MatMuls inside QAttention: the
    manifest's flops_per_token left them out (a quarter of each layer's FLOPs)."""
    from onnx import TensorProto, helper, numpy_helper

    from exporter.partition import node_costs

    hidden = 8
    weight = numpy_helper.from_array(np.ones((hidden, 3 * hidden), np.float32), "qkv")
    bias = numpy_helper.from_array(np.zeros(3 * hidden, np.float32), "bias")
    for op, inputs in (("Attention", ["x", "qkv", "bias"]),
                       ("QAttention", ["x", "qkv", "bias", "s", "s"])):
        node = helper.make_node(op, inputs, ["y"], domain="com.microsoft", num_heads=2)
        graph = helper.make_graph(
            [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, hidden])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, hidden])],
            [weight, bias])
        _, flops = node_costs(helper.make_model(graph))
        assert flops.tolist() == [2 * hidden * 3 * hidden]


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="ray is not installed (pip install 'edge-exporter[ray]')")
def test_ray_refuses_a_stage_plan_that_does_not_fit_its_graphs_at_load(tmp_path, monkeypatch):
    """StagedSession refuses such a plan (or a stage graph onnxruntime cannot read) at load;
    as Ray actors it loaded, and the first call failed inside a remote traceback (a graph that
    did not load: an ActorDiedError naming no file). The actors started are ended (each may
    hold a GPU)."""
    import copy

    import ray

    from exporter.partition import write_stages
    from runtime.bundle import BundleError
    from runtime.ray_stages import RayStagedSession

    records = write_stages(_chain_model(), 2, tmp_path, ["CPUExecutionProvider"])
    plan = copy.deepcopy(records)
    plan[1]["outputs"][0]["name"] = "nope"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        x = np.ones((2, 3), np.float32)
        session = RayStagedSession(tmp_path, records, outputs=["y"], threads=1)
        assert session.run(None, {"x": x})
        session.close()
        ended, close = [], RayStagedSession.close

        def counted_close(self):
            ended.append(len(self.actors))
            close(self)

        monkeypatch.setattr(RayStagedSession, "close", counted_close)
        with pytest.raises(BundleError, match=r"manifest\.json: stage 1 \(stage1\.onnx\) "
                                              r"lists inputs .* and outputs \['nope'\]"):
            RayStagedSession(tmp_path, plan, outputs=["nope"], threads=1)
        assert ended == [2]   # both actors ended
        (tmp_path / "stage1.onnx").write_bytes(b"not an onnx graph")   # runtime.load(verify=False)
        with pytest.raises(BundleError, match=r"stage1\.onnx: the Ray actor of stage 1 could "
                                              r"not load it: .*INVALID_PROTOBUF"):
            RayStagedSession(tmp_path, records, outputs=["y"], threads=1)
        assert ended == [2, 2]
    finally:
        ray.shutdown()


def test_a_ray_stage_actor_whose_gpu_did_not_start_is_said_where_the_bundle_was_loaded(
        tmp_path, monkeypatch):
    """Ray gave a stage actor a GPU it counts but the node does not have (on an H200 with
    `ray.init(num_gpus=2)`, stage 1's CUDA_VISIBLE_DEVICES=1): its CUDA did not start and the
    stage ran on the CPU, said only in the actor's own output. The actor now reports what
    it asked for and what it took, and the loading process warns."""
    import onnxruntime as ort

    from exporter.partition import write_stages
    from runtime.ray_stages import _StageWorker, say_fallbacks
    from runtime.stages import device_providers

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    records = write_stages(_chain_model(), 2, tmp_path, gpu)
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)   # onnxruntime-gpu
    with pytest.warns(RuntimeWarning, match="CUDAExecutionProvider is in this onnxruntime "
                                            "build but did not start"):
        worker = _StageWorker(0, (tmp_path / records[0]["file"]).read_bytes(), records,
                              ["y"], 1, device_providers("cuda:0", gpu), {})
    assert worker.check() == ("CUDAExecutionProvider", "CPUExecutionProvider")
    with pytest.warns(RuntimeWarning, match=r"In the Ray stage actors, stage 1 asked for "
                                            r"CUDAExecutionProvider and runs on "
                                            r"CPUExecutionProvider \(onnxruntime's log"):
        say_fallbacks([("CUDAExecutionProvider", "CUDAExecutionProvider"),
                       ("CUDAExecutionProvider", "CPUExecutionProvider")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        say_fallbacks([("CPUExecutionProvider", "CPUExecutionProvider")] * 2)
