"""MetricsWriter (JSON lines + TensorBoard), resume truncation, and plots."""

from __future__ import annotations

import glob
import json
import math
import os
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from gfn_jax.metrics import MetricsWriter, plot_histogram, plot_metrics, read_metrics


# --- minimal TFRecord reader with its own CRC-32C (Castagnoli), independent of tensorboardX ---

def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: str):
    """Parse a TensorBoard event file (TFRecord framing), checking both CRCs of every record."""
    events = []
    with open(path, "rb") as f:
        raw = f.read()
    pos = 0
    while pos < len(raw):
        header = raw[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
        assert len_crc == _masked_crc(header)
        data = raw[pos + 12:pos + 12 + length]
        (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
        assert data_crc == _masked_crc(data)
        events.append(event_pb2.Event.FromString(data))
        pos += 16 + length
    return events


def scalars_of(events):
    out = {}
    for e in events:
        for v in e.summary.value:
            out.setdefault(v.tag, []).append((e.step, v.simple_value))
    return out


def test_crc32c_reference_vector():
    assert _crc32c(b"123456789") == 0xE3069283  # standard CRC-32C check value


def test_jsonl_content(tmp_path):
    t0 = time.time()
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        w.write(0, {"loss": 1.5, "acc": np.float32(0.25), "n": 3, "lr": jnp.asarray(1e-3)})
        w.write(1, {"loss": float("nan"), "logz": jnp.array([2.0]), "ok": True})
        w.write(2, {"loss": float("inf"), "neg": -np.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    recs = [json.loads(l) for l in lines]  # strict JSON: no NaN/Infinity tokens
    assert "NaN" not in lines[1] and '"loss": null' in lines[1]
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert all(t0 - 1 <= r["time"] <= time.time() + 1 for r in recs)
    assert recs[0]["time"] <= recs[1]["time"] <= recs[2]["time"]
    assert recs[0]["loss"] == 1.5 and recs[0]["acc"] == 0.25 and recs[0]["n"] == 3.0
    assert recs[0]["lr"] == pytest.approx(1e-3)
    assert recs[1] == {"step": 1, "time": recs[1]["time"], "loss": None, "logz": 2.0, "ok": 1.0}
    assert recs[2]["loss"] == "inf" and recs[2]["neg"] == "-inf"
    back = read_metrics(tmp_path)
    assert math.isnan(back[1]["loss"]) and back[2]["loss"] == math.inf and back[2]["neg"] == -math.inf
    assert back[0]["loss"] == 1.5


def test_bad_metric_values(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        with pytest.raises(ValueError, match=r"metric 'v' must be a real scalar.*shape \(3,\)"):
            w.write(0, {"v": np.ones(3)})
        with pytest.raises(ValueError, match=r"'step' is reserved"):
            w.write(0, {"step": 1.0})
        with pytest.raises(ValueError, match=r"metric 's'"):
            w.write(0, {"s": "abc"})
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_tensorboard_events(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for s in range(3):
            w.write(s, {"loss": 1.0 / (s + 1), "reward/mean": float(s)})
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(files) == 1
    sc = scalars_of(read_events(files[0]))
    assert set(sc) == {"loss", "reward/mean"}
    assert [s for s, _ in sc["loss"]] == [0, 1, 2]
    np.testing.assert_allclose([v for _, v in sc["loss"]], [1.0, 0.5, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose([v for _, v in sc["reward/mean"]], [0.0, 1.0, 2.0])


def test_without_tensorboardx_metrics_still_go_to_jsonl(tmp_path, monkeypatch, caplog):
    """Without tensorboardX (a locked-down image running from source) the writer warns once,
    naming the package, and still writes metrics.jsonl; no event files appear."""
    import sys

    monkeypatch.delitem(sys.modules, "tensorboardX", raising=False)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
    with caplog.at_level("WARNING", logger="gfn_jax.metrics"):
        with MetricsWriter(tmp_path) as w:
            w.write(0, {"loss": 0.5})
            w.write(1, {"loss": 0.25})
    assert "pip install tensorboardX" in caplog.text
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(0, 0.5), (1, 0.25)]
    assert not glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))


def test_resume_truncates(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for s in range(10):
            w.write(s, {"loss": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "loss": 1')  # a crash mid-line
    time.sleep(1.1)  # tensorboardX names event files by the second
    with MetricsWriter(tmp_path, resume_step=5) as w:
        for s in range(6, 9):
            w.write(s, {"loss": 100.0 + s})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in recs] == [0, 1, 2, 3, 4, 5, 106, 107, 108]
    files = sorted(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")))
    assert len(files) == 2
    events = read_events(files[1])
    purge = [e for e in events if e.HasField("session_log")]
    assert purge and purge[0].session_log.status == event_pb2.SessionLog.START and purge[0].step == 6
    assert [s for s, _ in scalars_of(events)["loss"]] == [6, 7, 8]
    # Plain append (no resume_step) keeps everything.
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        w.write(9, {"loss": 9.0})
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [8, 9]


def test_only_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    w = MetricsWriter(tmp_path / "run")
    rec = w.write(0, {"loss": 1.0})
    assert rec["loss"] == 1.0
    assert w.write_summary({"a": 1}) is None
    w.close()
    assert not os.path.exists(tmp_path / "run")


def test_summary(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        path = w.write_summary({"final_loss": np.float32(0.5), "nan": float("nan"),
                                "counts": np.arange(3), "nested": {"t": (1, 2)}})
    got = json.loads(open(path).read())
    assert got == {"final_loss": 0.5, "nan": None, "counts": [0, 1, 2], "nested": {"t": [1, 2]}}


def _png_pixels(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    return img


def test_plot_metrics_explicit_keys(tmp_path):
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        for s in range(20):
            w.write(s, {"loss": 1.0 / (s + 1), "reward": float(s), "kl": float("nan") if s == 3 else 0.1 * s,
                        "logz": float(s % 3)})
    out = plot_metrics(tmp_path, keys=["loss", "reward", "kl", "logz"])
    assert out == os.path.join(str(tmp_path), "metrics.png")
    img = _png_pixels(out)
    # 4 panels -> 2 columns x 2 rows of 4x3-inch panels at 100 dpi.
    assert img.shape[:2] == (600, 800)
    assert (img[..., :3] < 0.5).any()  # something was drawn
    out2 = plot_metrics(tmp_path, keys=["loss"], out=tmp_path / "sub" / "loss.png")
    assert _png_pixels(out2).shape[:2] == (300, 400)
    with pytest.raises(ValueError, match=r"unknown metrics \['nope'\]"):
        plot_metrics(tmp_path, keys=["nope"])


def _training_like_metrics(tmp_path, loss_sign=1.0):
    with MetricsWriter(tmp_path, use_tensorboard=False) as w:
        for s in range(30):
            w.write(s, {"loss": loss_sign * 100.0 * 0.7 ** s, "log_r": -3.0 + 0.1 * s,
                        "tokens_per_s": 1000.0 + s, "grad_norm": 5.0 / (s + 1),
                        "behaviour": float(s % 2), "kl_coef": 0.05, "finite": 1.0})


def _axes(fig):
    return [(ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), ax.get_yscale()) for ax in fig.axes]


def test_default_figure_tells_the_story(tmp_path):
    from gfn_jax.metrics import metrics_figure

    _training_like_metrics(tmp_path)
    fig, name = metrics_figure(tmp_path)
    assert name == "metrics.png"
    assert _axes(fig) == [
        ("training loss", "training step", "loss (log scale)", "log"),
        ("mean log-reward of the batch", "training step", "mean log R (nats)", "linear"),
        ("throughput", "training step", "tokens / s", "linear"),
    ]
    # no task metric yet; evaluations of the run add the headline panel with their points
    (tmp_path / "eval_before.json").write_text(json.dumps({"tv_to_target": 0.5}))
    (tmp_path / "eval_after.json").write_text(json.dumps({"tv_to_target": 0.05}))
    fig, _ = metrics_figure(tmp_path)
    ax = fig.axes[-1]
    assert (ax.get_title(), ax.get_ylabel()) == ("task metric: tv_to_target",
                                                 "total variation to the target")
    pts = sorted((float(l.get_xdata()[0]), float(l.get_ydata()[0])) for l in ax.get_lines())
    assert pts == [(0.0, 0.5), (29.0, 0.05)]  # before at step 0, after at the last step
    out = plot_metrics(tmp_path)
    assert _png_pixels(out).shape[:2] == (600, 800)  # 4 panels: 2 x 2


def test_default_figure_negative_loss_is_linear(tmp_path):
    from gfn_jax.metrics import metrics_figure

    _training_like_metrics(tmp_path, loss_sign=-1.0)
    fig, _ = metrics_figure(tmp_path)
    assert _axes(fig)[0] == ("training loss", "training step", "loss", "linear")


def test_full_dump_is_optional_and_skips_constants_and_behaviour(tmp_path):
    from gfn_jax.metrics import metrics_figure

    _training_like_metrics(tmp_path)
    fig, name = metrics_figure(tmp_path, keys="all")
    assert name == "metrics_all.png"
    assert [a[0] for a in _axes(fig)] == ["grad_norm", "log_r", "loss", "tokens_per_s"]
    notes = [t.get_text() for t in fig.texts]
    assert notes and "finite=1" in notes[0] and "kl_coef=0.05" in notes[0]
    assert "behaviour" not in " ".join(notes)
    out = plot_metrics(tmp_path, keys="all")
    assert out == os.path.join(str(tmp_path), "metrics_all.png")
    assert not os.path.exists(tmp_path / "metrics.png")  # the default figure is separate


def test_plot_histogram(tmp_path):
    labels = [str(i) for i in range(20)]
    before = np.ones(20)
    after = np.zeros(20)
    after[[3, 7, 11]] = [5, 10, 5]
    out = plot_histogram({"before": before, "after": after}, labels, tmp_path / "h.png", title="numbers")
    img = _png_pixels(out)
    assert img.shape[0] == 400 and (img[..., :3] < 0.9).any()
    out1 = plot_histogram([1, 2, 3], ["a", "b", "c"], tmp_path / "one.png", normalize=True)
    assert os.path.getsize(out1) > 1000
    with pytest.raises(ValueError, match=r"series 'after' has shape \(3,\), expected \(20,\)"):
        plot_histogram({"before": before, "after": [1, 2, 3]}, labels, tmp_path / "bad.png")


def test_histogram_axis_says_what_it_shows(tmp_path, monkeypatch):
    """The y label is "count" for counts, "fraction" when normalised, or what the caller
    says (the RNG before/after figure passes fractions: its axis says so)."""
    import gfn_jax.metrics as m
    from gfn_jax.tasks.rng import RandomNumberTask

    labels = []
    real = m._figure

    def spy(w, h):
        fig = real(w, h)
        labels.append(fig)
        return fig

    monkeypatch.setattr(m, "_figure", spy)
    plot_histogram([1, 2], ["a", "b"], tmp_path / "c.png")
    plot_histogram([1, 2], ["a", "b"], tmp_path / "f.png", normalize=True)
    assert [f.axes[0].get_ylabel() for f in labels] == ["count", "fraction"]
    labels.clear()
    task = RandomNumberTask({})
    task.evaluate([{"text": str(k)} for k in range(100)], str(tmp_path), "before")
    task.evaluate([{"text": "7"}] * 10, str(tmp_path), "after")
    ylabels = [f.axes[0].get_ylabel() for f in labels]
    assert ylabels == ["number of samples (of 100)", "number of samples (of 10)",
                       "fraction of all samples"]
    bars = [p.get_height() for p in labels[-1].axes[0].patches]
    assert max(bars) == pytest.approx(1.0) and all(0 <= b <= 1 for b in bars)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch (when installed) for a type hint: ~2 s per process. The
    writer hides it during that import; the events are the same and torch stays importable."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from gfn_jax.metrics import MetricsWriter\n"
            f"with MetricsWriter({str(tmp_path)!r}) as w:\n"
            "    w.write(0, {'loss': 0.25})\n"
            "print('torch' in sys.modules)\n"
            "import torch\n"
            "print(torch.ones(2).sum().item())\n")
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "2.0"]
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert scalars_of(read_events(files[0]))["loss"] == [(0, 0.25)]
