"""benchmarks/: the peers emu_fast is measured against compute what the model's own
generate_image computes (so their timings are a fair comparison), and the benchmark's main
path (single point, sweep, --plot, --json) runs end to end on a tiny shape. No timing checks."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import emu_fast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import latency  # noqa: E402
from benchmarks.peers import hf_kv_cache_generate_image, static_cache_generate_image  # noqa: E402
from emu_fast.testing import rel_err, tiny_emu  # noqa: E402

# Ragged batch (both padding sides get exercised: Emu1 pads right, Emu2 left), prompt images in
# two rows.
TEXTS = ["a photo of a cat", "an oil painting [<IMG_PLH>] of a dog riding a bicycle, at dawn", "a [<IMG_PLH>]"]


def images(count):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["emu1", "emu2"])
def model_and_expected(request):
    model = tiny_emu(request.param, kv_heads=2)  # grouped KV heads too
    return model, model.generate_image(TEXTS, images(2))


def test_hf_kv_cache_baseline_matches_generate_image(model_and_expected):
    model, expected = model_and_expected
    assert rel_err(hf_kv_cache_generate_image(model, TEXTS, images(2)), expected) < 1e-4


def test_static_cache_loop_matches_generate_image(model_and_expected):
    model, expected = model_and_expected
    out = static_cache_generate_image(model, TEXTS, images(2))
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert rel_err(out, expected) < 1e-4


def test_static_cache_step_traces_as_one_graph(model_and_expected):
    """The step torch.compile sees: one graph (fullgraph=True), same result. The eager backend
    checks the trace without inductor's code generation, which takes far longer than a test."""
    torch._dynamo.reset()
    model, expected = model_and_expected
    out = static_cache_generate_image(model, TEXTS, images(2), compile_mode="default", compile_backend="eager")
    assert rel_err(out, expected) < 1e-4


MACHINE_FIELDS = {"cpu", "threads", "gpu", "torch", "transformers", "emu_fast_commit"}


def test_benchmark_point_json(tmp_path, capsys):
    path = tmp_path / "point.json"
    latency.main(["--shape", "tiny", "--kind", "emu2", "--batch", "2", "--prompt-len", "24", "--n", "4",
                  "--reps", "1", "--no-compile", "--json", str(path)])
    printed = capsys.readouterr().out
    assert not re.search(r"\bnan\b", printed)
    data = json.loads(path.read_text())
    assert MACHINE_FIELDS <= set(data["machine"])
    # the keys earlier results/*.json have
    assert {"date", "commit", "device", "torch", "config", "prompt_tokens", "n", "step_weight_bytes",
            "read_bandwidth_GBps", "methods"} <= set(data)
    methods = data["methods"]
    assert set(methods) == set(latency.METHODS)
    for name in (latency.HF, latency.EAGER, latency.FAST_ATEN, latency.FAST):
        assert methods[name]["status"] == "ok" and methods[name]["matches_reference"], name
        assert methods[name]["reference"] == latency.UPSTREAM
    assert methods[latency.COMPILED] == {"status": "skipped", "note": "skipped (--no-compile)",
                                         "image_ms": None, "step_ms": None}
    assert "skipped (--no-compile)" in printed


def test_benchmark_sweep_plot_json(tmp_path, capsys):
    png, path = tmp_path / "sweep.png", tmp_path / "sweep.json"
    latency.main(["--shape", "tiny", "--n", "4", "--reps", "1", "--no-compile", "--skip-upstream", "--sweep",
                  "--prompt-len", "16", "--sweep-batches", "1,3", "--sweep-prompt-lens", "16,40",
                  "--plot", str(png), "--json", str(path)])
    printed = capsys.readouterr().out
    assert not re.search(r"\bnan\b", printed) and "skipped (--skip-upstream)" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(path.read_text())
    assert MACHINE_FIELDS <= set(data["machine"])
    points = data["sweep"]["batch"] + data["sweep"]["prompt_len"]
    assert [p["batch"] for p in data["sweep"]["batch"]] == [1, 3] and len(data["sweep"]["prompt_len"]) == 2
    for p in points:
        f = p["methods"]
        assert f[latency.UPSTREAM]["status"] == "skipped"
        for name in (latency.EAGER, latency.FAST):
            assert f[name]["matches_reference"] and f[name]["reference"] == latency.HF, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_quantized_gemv_benchmark_runs(monkeypatch, capsys, device):
    """benchmarks/quantized_gemv.py (gpu_verify.sh runs it on CUDA): a row per op, each with its
    time, bytes and bandwidth, the bf16 row as the 1.00x base."""
    from benchmarks import quantized_gemv
    monkeypatch.setattr(quantized_gemv, "WORKING_SET", 2**21)  # a few copies, not 256 MB
    monkeypatch.setattr(sys, "argv", ["quantized_gemv.py", "--k", "1024", "--n", "256", "--batch", "3", "--reps", "2",
                                      "--device", device])
    quantized_gemv.main()
    rows = re.findall(r"^(gemv bf16|gemv_int8|gemv_int4|gemv_int4, int8 activations)\s+([\d.]+) ms\s+reads\s+"
                      r"([\d.]+) MB.*?([\d.]+)x bf16$", capsys.readouterr().out, re.M)
    names = ["gemv bf16", "gemv_int8", "gemv_int4"] + (["gemv_int4, int8 activations"] if device == "cpu" else [])
    assert [r[0] for r in rows] == names
    assert float(rows[0][3]) == 1.0 and all(float(r[1]) > 0 for r in rows)
    assert float(rows[0][2]) > float(rows[1][2]) > float(rows[2][2])  # bf16 > int8 > int4 bytes
    assert rows[3:] == [] or rows[3][2] == rows[2][2]  # the int8-activation row reads the same int4 bytes
    assert emu_fast.quantized_activations() == "auto"  # and puts the setting back


def test_load_benchmark_runs(tmp_path):
    """benchmarks/load.py --quick: both methods load the generated checkpoint to a decoder of the
    same quantized weights, each in its own process, and the table and JSON report them."""
    import subprocess

    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, "benchmarks/load.py", "--quick", "--json", str(out), "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^from_pretrained\s+[\d.]+", done.stdout, re.M)
    assert re.search(r"^dispatch\+accelerate\s+[\d.]+", done.stdout, re.M)
    result = json.loads(out.read_text())
    runs = result["results"]
    assert runs["from_pretrained"]["weight_bytes"] == runs["dispatch+accelerate"]["weight_bytes"] > 0
    assert all(r["seconds"] > 0 and r["rss_peak"] >= r["rss_before"] for r in runs.values())


def test_serve_benchmark_runs(tmp_path):
    """benchmarks/serve.py end to end on the tiny shape: every method, closed and open loop, its
    JSON, summary and plot."""
    import subprocess

    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    done = subprocess.run([sys.executable, "benchmarks/serve.py", "--shape", "tiny", "--n", "4", "--clients", "1", "2",
                           "--rates", "20", "--requests", "4", "--threads", "1", "--no-progress", "--json", str(out),
                           "--plot", str(png)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for loop, points in (("closed_loop", 2), ("open_loop", 1)):
        assert set(results[loop]) == {"one at a time", "static batching", "emu_fast.Engine"}
        for rows in results[loop].values():
            assert len(rows) == points and all(r["images_per_s"] > 0 and r["p50_s"] <= r["p99_s"] for r in rows)
    assert results["summary"]["clients"] == 2 and "vs_static_batching" in results["summary"]
    assert png.stat().st_size > 0


def test_tensor_parallel_benchmark_runs(tmp_path):
    """torchrun --nproc-per-node 2 benchmarks/latency.py --tp 2 on the tiny shape: both ways
    measured, the images compared, the JSON written."""
    import subprocess

    out = tmp_path / "tp.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "benchmarks/latency.py", "--tp", "2", "--shape", "tiny", "--reps", "1",
                           "--threads", "2", "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["world"] == 2 and r["threads_per_rank"] == 1 and r["rel_err"] < 1e-5
    assert r["rank_weight_bytes"] < 0.75 * r["step_weight_bytes"]
    assert r["one_process"]["steps"] > 0 and r["tensor_parallel"]["steps"] > 0 and r["all_reduce_s"] > 0
