"""Reliability: incomplete stores, concurrent writers, bad images, bad stores, full disks,
and property tests of the parsers and of store metadata."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import CLI, faulty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

import probekit
from probekit.backbones import parse_layers
from probekit.cache.store import FeatureStore, StoreConfig, StoreLock
from probekit.cli import app
from probekit.datasets import load_dataset
from probekit.errors import InvalidImageError, ProbekitError, ProbekitWarning, StoreError

runner = CliRunner()
SMALL = {"chunk_rows": 4, "batch_size": 4, "num_workers": 0, "quiet": True}
EXTRACT = ["-b", "test_resnet", "--random-init", "--pool", "mean", "--chunk-rows", "4"]
EXTRACT += ["--batch-size", "4", "--num-workers", "0", "--quiet"]


def _one_line_error(res: object, needle: str) -> None:
    assert res.exit_code == 1, res.output  # type: ignore[attr-defined]
    out: str = res.output  # type: ignore[attr-defined]
    assert out.startswith("error: ") and needle in out and "Traceback" not in out, out


def _files(path: str) -> dict[str, bytes]:
    root = Path(path)
    return {
        str(f.relative_to(root)): f.read_bytes()
        for f in root.rglob("*")
        if f.is_file() and f.name != "zarr.json"
    }


# --------------------------------------------------------------------------- incomplete stores


def test_readers_of_an_incomplete_store_stop_or_read_only_finished_chunks() -> None:
    res = probekit.extract("test_resnet", "synthetic:4", random_init=True, pool="mean", **SMALL)
    store = probekit.open_store(res.store_path)
    store.group["train/done"][1] = False  # as if the run was cut in its 2nd train chunk
    store.update_meta(status="partial")
    _one_line_error(runner.invoke(app, ["knn", res.store_path, "--k", "3"]), "incomplete")
    _one_line_error(runner.invoke(app, ["probe", res.store_path]), "--allow-partial")
    with pytest.warns(ProbekitWarning, match="using the 3 of 4 chunks"):
        knn = probekit.knn(res.store_path, ks=[3], allow_partial=True, write=False)
    assert store.meta["splits"] == {"train": 12, "test": 4}
    assert {r.n for r in knn.records if r.split == "test"} == {4}
    with pytest.warns(ProbekitWarning, match="incomplete"):
        ok = runner.invoke(app, ["knn", res.store_path, "--k", "3", "--allow-partial"])
    assert ok.exit_code == 0, ok.output
    partial = FeatureStore(store.path, zarr.open_group(res.store_path, mode="r"))
    assert partial.valid("train").tolist() == [True] * 4 + [False] * 4 + [True] * 4
    # verify: sound but incomplete, said with the count and a non-zero exit (not "ok")
    got = probekit.verify(res.store_path)
    assert got.ok and not got.complete
    assert got.summary().startswith("incomplete: ") and "1 of 4 chunks pending" in got.summary()
    cli = runner.invoke(app, ["verify", res.store_path])
    assert cli.exit_code == 2 and "incomplete" in cli.output and "ok:" not in cli.output


# --------------------------------------------------------------------------- concurrent writers


def test_a_second_writer_is_refused_and_a_killed_holder_frees_the_lock(tmp_path: Path) -> None:
    res = probekit.extract("test_resnet", "synthetic:2", random_init=True, pool="mean", **SMALL)
    before = _files(res.store_path)
    with StoreLock(Path(res.store_path)):
        busy = runner.invoke(app, ["extract", *EXTRACT, "-d", "synthetic:2", "--overwrite"])
    _one_line_error(busy, f"another probekit process (pid {os.getpid()})")
    assert _files(res.store_path) == before  # nothing touched
    # a holder killed with SIGKILL cannot leave the lock behind: the OS drops it
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from probekit.cache.store import "
            "StoreLock; lock = StoreLock(Path(sys.argv[1])).__enter__(); print('held', "
            "flush=True); time.sleep(60)",
            res.store_path,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with (
        pytest.raises(StoreError, match="another probekit process"),
        StoreLock(Path(res.store_path)),
    ):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    with StoreLock(Path(res.store_path)):  # free again
        pass


def test_two_extractions_of_one_store_at_once(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "probekit", "extract", *EXTRACT, "-d", "synthetic:8"]
    env = {**os.environ, "PROBEKIT_CACHE": str(tmp_path / "both")}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [(p.communicate()[1], p.returncode)[::-1] for p in procs]
    assert any(code == 0 for code, _ in outs), outs
    for code, text in outs:  # the other one finished after it (a cache hit) or was refused
        assert code == 0 or (code == 1 and "another probekit process" in text), text
    clean = {**os.environ, "PROBEKIT_CACHE": str(tmp_path / "alone")}
    subprocess.run(cmd, env=clean, check=True, capture_output=True)
    both = next((tmp_path / "both").glob("*/*.zarr"))
    alone = next((tmp_path / "alone").glob("*/*.zarr"))
    assert probekit.open_store(both).is_complete
    assert _files(str(both)) == _files(str(alone))


# --------------------------------------------------------------------------- bad images


def _png_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _bad_folder(root: Path) -> dict[str, bool]:
    """train/test folders holding every awkward image; returns {file name: expected valid}."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))
    cases: dict[str, bool] = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                photo.save(d / f"ok{i}.jpg")
    d = root / "train" / "a"
    photo.save(d / "full.jpg")
    whole = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "bomb.png").write_bytes(_png_bomb(40_000, 40_000))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16)).save(d / "sixteen.png")
    photo.convert("CMYK").save(d / "cmyk.jpg")
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(d / "rotated.jpg", exif=exif)
    cases.update({"truncated.jpg": False, "zero.jpg": False, "text.jpg": False})
    cases.update({"bomb.png": False, "one.png": True, "sixteen.png": True, "cmyk.jpg": True})
    cases.update({"palette.png": True, "rotated.jpg": True, "full.jpg": True})
    return cases


def test_every_kind_of_bad_image_is_read_or_marked_with_its_reason(tmp_path: Path) -> None:
    cases = _bad_folder(tmp_path / "imgs")
    spec = f"imagefolder:{tmp_path / 'imgs'}"
    res = probekit.extract("test_resnet", spec, random_init=True, pool="mean", **SMALL)
    store = probekit.open_store(res.store_path)
    ids = [Path(i).name for i in store.ids("train")]
    valid = dict(zip(ids, store.valid("train").tolist(), strict=True))
    reasons = {Path(i).name: r for i, r in store.invalid("train")}
    for name, expected in cases.items():
        assert valid[name] is expected, (name, reasons.get(name))
    assert "DecompressionBomb" in reasons["bomb.png"]
    assert all(reasons[n] for n, ok in cases.items() if not ok)
    assert res.invalid == 4 and store.meta["invalid"] == 4
    assert f"{res.invalid} invalid" in res.summary()
    feats = store.features("train", "head/embed")
    assert np.isfinite(feats).all() and not feats[~store.valid("train")].any()
    with pytest.raises(InvalidImageError, match="strict"):
        probekit.extract(
            "test_resnet", spec, random_init=True, pool="mean", strict=True, overwrite=True, **SMALL
        )


# --------------------------------------------------------------------------- bad stores, disks


def test_a_store_of_another_format_version_is_refused() -> None:
    res = probekit.extract("test_resnet", "synthetic:2", random_init=True, pool="mean", **SMALL)
    group = zarr.open_group(res.store_path, mode="r+")
    meta = dict(group.attrs["probekit"])  # type: ignore[arg-type]
    meta["format_version"] = 999
    group.attrs["probekit"] = meta
    _one_line_error(runner.invoke(app, ["knn", res.store_path]), "store format 999")
    _one_line_error(runner.invoke(app, ["probe", res.store_path]), "re-extract it")


def test_a_full_disk_is_one_line_and_the_rerun_finishes_the_store(tmp_path: Path) -> None:
    args = ["extract", *EXTRACT, "-d", "synthetic:4"]
    env = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "full"), "FULL_AT": "3"})
    run = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True)
    err = run.stderr.decode()
    assert run.returncode == 1 and "No space left on device" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    path = next((tmp_path / "full").glob("*/*.zarr"))
    done = sum(int(zarr.open_group(str(path))[f"{s}/done"][:].sum()) for s in ("train", "test"))
    total = sum(int(zarr.open_group(str(path))[f"{s}/done"].shape[0]) for s in ("train", "test"))
    assert 2 <= done < total  # chunks written before (or beside) the failed one; it is not done
    env["FULL_AT"] = "0"
    subprocess.run([sys.executable, "-c", CLI, *args], env=env, check=True)
    clean = faulty({**os.environ, "PROBEKIT_CACHE": str(tmp_path / "clean"), "FULL_AT": "0"})
    subprocess.run([sys.executable, "-c", CLI, *args], env=clean, check=True)
    assert _files(str(path)) == _files(str(next((tmp_path / "clean").glob("*/*.zarr"))))


def test_stores_hold_only_arrays_and_json() -> None:
    res = probekit.extract("test_resnet", "synthetic:2", random_init=True, pool="mean", **SMALL)
    root = Path(res.store_path)
    for f in root.rglob("*"):
        if f.name == "zarr.json":
            json.loads(f.read_text())  # metadata and attributes: JSON
        elif f.is_file():  # everything else is a chunk of an array (Zarr v3 keys: .../c/i/j)
            assert "c" in f.relative_to(root).parts, f

    def arrays(group: zarr.Group) -> list[zarr.Array]:
        out: list[zarr.Array] = []
        for _, node in group.members():
            out += arrays(node) if isinstance(node, zarr.Group) else [node]
        return out

    kinds = {np.asarray(a[:1]).dtype.kind for a in arrays(zarr.open_group(str(root), mode="r"))}
    assert kinds <= set("biufUT"), kinds  # numbers, booleans and strings: never objects


# --------------------------------------------------------------------------- properties

LAYER_SPEC = st.one_of(
    st.just("all"),
    st.integers(-3, 40).map(lambda k: f"last{k}"),
    st.lists(st.integers(-40, 40), min_size=1, max_size=6).map(lambda v: ",".join(map(str, v))),
    st.text(max_size=12),
)


@given(spec=LAYER_SPEC, n=st.integers(1, 32))
@settings(max_examples=300, deadline=None)
def test_layer_specs_give_valid_layers_or_a_clear_error(spec: str, n: int) -> None:
    try:
        layers = parse_layers(spec, n)
    except ProbekitError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert list(layers) == sorted(set(layers)) and all(0 <= i < n for i in layers)
    head_only = all(t.strip().lower() in ("", "head") for t in spec.split(","))
    assert bool(layers) != head_only  # nothing but the head: no intermediate layers
    if spec == "all":
        assert layers == tuple(range(n))
    if spec.startswith("last"):
        assert layers == tuple(range(n - int(spec[4:]), n))


@given(
    spec=st.one_of(
        st.text(max_size=20),
        st.sampled_from(["synthetic", "digits", "imagefolder", "csv", "mnist5k"]).flatmap(
            lambda k: st.text(max_size=8).map(lambda a: f"{k}:{a}")
        ),
    )
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_dataset_specs_load_or_give_a_clear_error(spec: str) -> None:
    with tempfile.TemporaryDirectory() as empty, contextlib.chdir(empty):  # relative paths
        try:
            ds = load_dataset(spec)
        except ProbekitError as e:
            assert str(e) and "\n" not in str(e)
            return
    assert ds.splits and all(len(v) > 0 for v in ds.splits.values())


@given(
    layers=st.lists(st.integers(0, 48), max_size=5, unique=True).map(lambda v: tuple(sorted(v))),
    pools=st.lists(st.sampled_from(["cls", "mean", "gem", "cls+mean"]), max_size=3, unique=True),
    prep=st.dictionaries(
        st.text(min_size=1, max_size=6),
        st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
        max_size=4,
    ),
    dtype=st.sampled_from(["float16", "float32"]),
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_store_metadata_round_trips(
    tmp_path_factory: pytest.TempPathFactory,
    layers: tuple[int, ...],
    pools: list[str],
    prep: dict,
    dtype: str,
) -> None:
    cfg = StoreConfig("ds", "model", "w", prep, layers, tuple(pools), dtype, "fp32")  # type: ignore[arg-type]
    path = tmp_path_factory.mktemp("meta") / "s.zarr"
    dims = dict.fromkeys(cfg.feature_names, 3)
    meta = {"dataset": {"spec": "ds"}, "class_names": ["a", "é", "c d"]}
    FeatureStore.create(path, cfg, meta, {"train": 5}, dims, 2, set())
    back = probekit.open_store(path, allow_partial=True).meta
    assert back["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert back["cache_key"] == cfg.key
    assert back["feature_names"] == cfg.feature_names and back["class_names"] == meta["class_names"]
    again = StoreConfig(
        **{
            **back["config"],
            "layers": tuple(back["config"]["layers"]),
            "pools": tuple(back["config"]["pools"]),
        }
    )
    assert again.key == cfg.key  # the cache key survives the JSON round trip


# --------------------------------------------------------------------------- interrupted triage

TRIAGE_KILLER = """
import os, signal, sys
import probekit.triaging
t = sys.modules["probekit.triaging"]
real, calls = t._evaluate, [0]
def evaluate(b, *args, **kw):
    calls[0] += 1
    print(f"evaluating {b.label}", flush=True)
    if calls[0] == int(os.environ.get("KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(b, *args, **kw)
t._evaluate = evaluate
from probekit.cli import main
sys.argv = ["probekit"] + sys.argv[1:]
main()
"""


def _numbers(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keep = ("model", "dataset", "split", "method", "metric", "layer", "pool", "k", "vote", "value")
    return sorted(
        tuple(str(r.get(f)) for f in keep) for r in rows if r.get("kind") in ("knn", "probe")
    )


@pytest.mark.slow
def test_an_interrupted_triage_keeps_finished_evaluations(tmp_path: Path) -> None:
    args = ["triage", "--backbones", "test_resnet@random,test_vit@random", "-d", "synthetic:16"]
    args += ["--methods", "knn,logreg", "--k", "3", "--img-size", "32", "--no-plots", "--quiet"]
    env = {**os.environ, "PROBEKIT_CACHE": str(tmp_path / "cache"), "KILL_AT": "2"}
    out = tmp_path / "report"
    killed = subprocess.run(
        [sys.executable, "-c", TRIAGE_KILLER, *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert killed.stdout.count("evaluating") == 2 and not (out / "results.jsonl").exists()
    env["KILL_AT"] = "0"
    rerun = subprocess.run(
        [sys.executable, "-c", TRIAGE_KILLER, *args, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stdout.count("evaluating") == 1  # only the interrupted one is redone
    assert "evaluating test_vit@random" in rerun.stdout
    assert "test_resnet@random on synthetic:16" in rerun.stdout and "kept from an earlier run" in (
        rerun.stdout
    )
    clean = subprocess.run(
        [sys.executable, "-c", TRIAGE_KILLER, *args, "--out", str(tmp_path / "clean")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert _numbers(out) == _numbers(tmp_path / "clean") and _numbers(out)


def test_non_finite_features_are_never_written_nor_scored(tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {
        k: v.clone().contiguous() for k, v in timm.create_model("test_resnet").state_dict().items()
    }
    sd["layer4.0.downsample.2.weight"][0] = float("nan")  # the last stage turns NaN
    save_file(sd, str(tmp_path / "nan.safetensors"))
    res = probekit.extract(
        "test_resnet", "synthetic:4", weights=tmp_path / "nan.safetensors", pool="mean", **SMALL
    )
    store = probekit.open_store(res.store_path)
    assert res.invalid == 16 and "16 invalid" in res.summary()
    assert {why for _, why in store.invalid("train")} == {"non-finite features"}
    for name in store.feature_names:  # nothing non-finite on disk, invalid rows are zeros
        x = store.features("train", name)
        assert np.isfinite(x).all() and not x.any()
    with pytest.raises(StoreError, match="no usable rows \\(non-finite features: 12\\)"):
        probekit.knn(store, write=False)
    with pytest.raises(StoreError, match="no usable rows"):
        probekit.probe(store, write=False)


# --------------------------------------------------------------------------- code from a path

USER_MODULE = """
import pathlib, timm, torch
pathlib.Path(__file__).with_name("imported").write_text("yes")  # the side effect we watch
def build():
    torch.manual_seed(3)
    return timm.create_model("test_resnet")
"""


@pytest.mark.slow
def test_a_python_path_backbone_runs_only_when_given_explicitly(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "userbackbones.py").write_text(USER_MODULE)
    marker = tmp_path / "code" / "imported"
    env = {**os.environ, "PROBEKIT_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "code"), env.get("PYTHONPATH", "")])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "probekit", *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)

    assert cli("extract", "-b", "userbackbones", "-d", "synthetic:2").returncode == 1
    assert not marker.exists()  # a bare module name is never imported
    run = cli("extract", "-b", "userbackbones:build", "-d", "synthetic:16", "--pool", "mean")
    assert run.returncode == 0 and marker.exists(), run.stderr
    store = next((tmp_path / "cache").glob("*/*.zarr"))
    meta = probekit.open_store(store).meta
    assert meta["weights"]["source"] == "python" and meta["config"]["backbone"] == (
        "userbackbones:build"
    )
    marker.unlink()
    for args in (["ls"], ["info", str(store)], ["knn", str(store), "--k", "3"]):
        assert cli(*args).returncode == 0
    assert cli("probe", str(store), "--method", "logreg").returncode == 0
    assert cli("report", str(store.parent), "--out", str(tmp_path / "rep")).returncode == 0
    assert not marker.exists()  # stores, records and reports never run the code they name
    again = cli("extract", "-b", "userbackbones:build", "-d", "synthetic:16", "--pool", "mean")
    assert again.returncode == 0 and "cache hit" in again.stdout + again.stderr
    bad = cli("extract", "-b", "userbackbones:nothing", "-d", "synthetic:2")
    assert bad.returncode == 1 and "has no function 'nothing'" in bad.stderr


# --------------------------------------------------------------------------- bad arguments


def test_bad_arguments_on_the_command_line_are_one_line_and_change_nothing(
    tmp_path: Path, image_folder: Path
) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    _one_line_error(
        runner.invoke(app, ["extract", *EXTRACT, "-d", f"imagefolder:{tmp_path / 'empty'}"]),
        "holds no images",
    )
    spec = f"imagefolder:{image_folder}"
    ok = runner.invoke(app, ["extract", *EXTRACT, "-d", spec])
    assert ok.exit_code == 0, ok.output
    store = next((tmp_path / "cache").glob("*/*.zarr"))
    before = _files(str(store))
    _one_line_error(
        runner.invoke(app, ["knn", str(store), "--k", "500"]), "larger than the database"
    )
    _one_line_error(runner.invoke(app, ["knn", str(store), "--k", "ten"]), "--k takes integers")
    _one_line_error(
        runner.invoke(app, ["probe", str(store), "--features", "layer9/max"]), "unknown feature"
    )
    _one_line_error(
        runner.invoke(app, ["knn", str(store), "--features", "last9/cls"]), "lacks layer0/cls"
    )
    (image_folder / "test" / "cat" / "new.png").write_bytes(
        (image_folder / "test" / "cat" / "1.png").read_bytes()
    )
    _one_line_error(runner.invoke(app, ["extract", *EXTRACT, "-d", spec]), "changed since")
    assert _files(str(store)) == before  # none of it touched the store
