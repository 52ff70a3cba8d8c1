"""``fastpref demo``: the command, its dataset, its outputs and its errors (a few short runs, CPU or GPU)."""

import json
import pathlib
import struct
import subprocess
import sys
import zlib

import pytest

pytest.importorskip("transformers")

from fastpref.cli import main  # noqa: E402
from fastpref.demo import COLUMNS, DEFAULT_METHODS, METHODS, DemoConfig, load_data, load_records, run  # noqa: E402
from fastpref.demo import make_dataset  # noqa: E402
from fastpref.demo.data import dataset_path  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# What `fastpref demo` trains with no --method, in order; the README documents this list.
DOCUMENTED_METHODS = ("dpo", "ipo", "simpo", "pro", "pro-binary", "pro-scalar", "dro", "typo", "auxdpo", "drdo")
FAST = ["--steps", "3", "--sft-steps", "2", "--no-progress"]


def _png_ok(path: pathlib.Path) -> bool:
    """PNG signature, an IHDR chunk first and an IEND chunk last, every chunk's CRC right."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return False
        kinds.append(kind)
        pos += 12 + length
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds


def _table_rows(stdout: str) -> dict:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {}
    for line in lines[header + 2:]:
        parts = line.split()
        if not parts or parts[0] not in METHODS:
            break
        rows[parts[0]] = parts[1:]
    return lines[header], rows


# ------------------------------------------------------------------------------------------------ dataset


def test_dataset_is_byte_identical_to_regeneration(tmp_path):
    shipped = dataset_path().read_bytes()
    assert make_dataset.generate().encode() == shipped
    out = tmp_path / "regen.jsonl"
    assert make_dataset.main(["--out", str(out)]) == 0
    assert out.read_bytes() == shipped
    assert make_dataset.main(["--check", "--out", str(out)]) == 0


def test_dataset_ground_truth():
    meta, records = load_records()
    good, bad = set(meta["good_tokens"]), set(meta["bad_tokens"])
    assert not good & bad and meta["vocab_size"] == 64
    splits = [r["split"] for r in records]
    assert splits.count("train") == meta["splits"]["train"] and splits.count("test") == meta["splits"]["test"]
    for r in records:
        rewards = [make_dataset.true_reward(resp, good, bad) for resp in r["responses"]]
        assert r["rewards"] == rewards
        assert r["labels"] == [int(x > 0) for x in rewards]
        assert rewards[r["chosen"]] == max(rewards) > min(rewards) == rewards[r["rejected"]]
        assert r["prompt"][0] == make_dataset.BOS and r["prompt"][-1] == make_dataset.SEP
        for resp in r["responses"] + [r["ref_sample"]]:
            assert resp[-1] == make_dataset.EOS and all(4 <= t < 64 for t in resp[:-1])
    data = load_data()
    assert data.train.ids.shape[:2] == (meta["splits"]["train"], make_dataset.K + 1)
    assert (data.train.rewards.gather(1, data.train.chosen[:, None])
            > data.train.rewards.gather(1, data.train.rejected[:, None])).all()


# ------------------------------------------------------------------------------------------------ the command


def test_demo_dpo_via_main(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--method", "dpo", "--out", str(out), *FAST]) == 0
    stdout = capsys.readouterr().out
    header, rows = _table_rows(stdout)
    for column in COLUMNS:
        assert column in header
    assert list(rows) == ["dpo"] and len(rows["dpo"]) == len(COLUMNS) - 1  # one value per column after the name
    assert _png_ok(out / "curves.png")
    results = json.loads((out / "results.json").read_text())
    (r,) = results["results"]
    assert r["method"] == "dpo" and len(r["losses"]) == 3 and r["eval_steps"][0] == 0 and r["eval_steps"][-1] == 3
    assert r["acc_before"] == 0.5  # the policy starts at the reference: every implicit reward is 0, a tie
    assert r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0


def test_demo_via_python_m_subprocess(tmp_path):
    out = tmp_path / "sub"
    proc = subprocess.run(
        [sys.executable, "-m", "fastpref", "demo", "--method", "pro", "--out", str(out), *FAST],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, rows = _table_rows(proc.stdout)
    assert list(rows) == ["pro"]
    assert _png_ok(out / "curves.png")


def test_default_method_list_is_the_documented_one(tmp_path, capsys):
    assert DEFAULT_METHODS == DOCUMENTED_METHODS
    assert set(DOCUMENTED_METHODS) <= set(METHODS)
    for required in ("dpo", "pro", "dro", "typo", "auxdpo", "drdo", "simpo"):
        assert required in DEFAULT_METHODS
    from fastpref.cli import _parser

    assert _parser().parse_args(["demo"]).method == list(DOCUMENTED_METHODS)
    assert _parser().parse_args(["demo", "--method", "all"]).method == list(DOCUMENTED_METHODS)
    readme = (REPO / "README.md").read_text()
    if "fastpref demo" in readme and "--method" in readme:  # once the README documents the demo's options
        missing = [m for m in DOCUMENTED_METHODS if m not in readme]
        assert not missing, f"README documents `fastpref demo` but not its methods {missing}"
    # Two of the methods, a few steps, through the same path as the default run (same order as named).
    out = tmp_path / "two"
    assert main(["demo", "--method", "typo,drdo", "--out", str(out), *FAST]) == 0
    _, rows = _table_rows(capsys.readouterr().out)
    assert list(rows) == ["typo", "drdo"]
    assert [r["method"] for r in json.loads((out / "results.json").read_text())["results"]] == ["typo", "drdo"]


def test_training_improves_held_out_accuracy():
    results, info = run(load_data(), DemoConfig(methods=["dpo", "pro"], steps=30, sft_steps=30, progress=False))
    for r in results:
        assert r.acc_before == 0.5
        assert r.acc_after > 0.8, (r.method, r.eval_accs)
    assert info["sft_final_nll"] < info["uniform_nll"]


# ------------------------------------------------------------------------------------------------ errors, help


@pytest.mark.parametrize("argv", [
    ["demo", "--method", "nope"],
    ["demo", "--method", "dpo,nope"],
    ["demo", "--steps", "0"],
    ["demo", "--steps", "-4"],
    ["demo", "--steps", "many"],
    ["demo", "--lr", "0"],
    ["demo", "--device", "tpu"],
    ["demo", "--bogus"],
    [],
    ["nope"],
])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in captured.err
    assert captured.out == ""


def test_cuda_without_cuda_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["demo", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA" in err[0]
    assert main(["demo", "--device", "cpu", "--backend", "triton"]) == 2


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["demo", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--steps", "--seed", "--out", "--device"):
        assert flag in out


def test_missing_transformers_is_one_line(monkeypatch, capsys):
    import fastpref.cli as cli

    monkeypatch.setattr(cli, "_has_module", lambda name: name != "transformers")
    assert main(["demo", "--method", "dpo"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[demo]"' in err[0]


def test_missing_matplotlib_skips_the_png(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "noplot"
    assert main(["demo", "--method", "ipo", "--out", str(out), *FAST]) == 0
    stdout = capsys.readouterr().out
    notes = [line for line in stdout.splitlines() if "matplotlib" in line and "PNG" in line]
    assert len(notes) == 1 and "not installed" in notes[0]
    assert not (out / "curves.png").exists() and (out / "results.json").exists()


def test_text_progress_bar_without_tqdm(monkeypatch, capsys):
    from fastpref.demo import train

    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    bar = train._progress(4, "dpo", True)
    assert isinstance(bar, train._TextBar)
    for _ in range(4):
        bar.update()
    bar.set_postfix_str("loss 0.1")
    bar.close()
    err = capsys.readouterr().err
    assert "dpo [" in err and "4/4" in err and err.endswith("\n")


# ------------------------------------------------------------------------------------------------ issue 9: the newcomer


@pytest.fixture
def no_training(monkeypatch):
    import fastpref.demo.train as train

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "run", boom)


@pytest.mark.parametrize("case", ["file", "file-parent", "json-is-dir", "png-is-dir"])
def test_unusable_out_fails_before_training(case, tmp_path, capsys, no_training):
    target = tmp_path / "out"
    if case == "file":
        target.write_text("a file, not a folder")
    elif case == "file-parent":
        (tmp_path / "f").write_text("x")
        target = tmp_path / "f" / "out"
    else:
        (target / ("results.json" if case == "json-is-dir" else "curves.png")).mkdir(parents=True)
    assert main(["demo", "--method", "dpo", "--out", str(target), *FAST]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "Traceback" not in captured.err
    assert "fastpref demo:" not in captured.out  # nothing started


def test_out_is_created_and_checked_before_training(tmp_path, capsys, no_training):
    """A writable folder passes the check (and exists afterwards); the training then starts."""
    target = tmp_path / "new" / "deeper"
    with pytest.raises(AssertionError, match="training started"):
        main(["demo", "--method", "dpo", "--out", str(target), *FAST])
    assert target.is_dir() and not list(target.iterdir())  # the probe file is gone


def test_batch_pairs_larger_than_the_dataset(capsys, no_training):
    prompts = load_data().train.num_prompts
    assert main(["demo", "--batch-pairs", str(prompts + 1), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-pairs" in err[0] and str(prompts) in err[0]


def test_run_rejects_batch_pairs_larger_than_the_dataset():
    from fastpref.demo.train import _run

    data = load_data()
    with pytest.raises(ValueError, match="batch_pairs"):
        _run(data, DemoConfig(methods=["dpo"], batch_pairs=data.train.num_prompts + 1), torch_device("cpu"))


def torch_device(name):
    import torch

    return torch.device(name)


def _fake_result(name, i):
    from fastpref.demo.train import MethodResult

    return MethodResult(method=name, title=METHODS[name].title, final_loss=1.0, acc_before=0.5, acc_after=0.9,
                        chosen_logp_change=-1.0, rejected_logp_change=-3.0, tokens_per_s=1e4, peak_memory_mb=300.0,
                        memory_kind="process peak RSS", seconds=1.0, losses=[1.0 - 0.01 * k for k in range(20)],
                        eval_steps=[0, 10, 20], eval_accs=[0.5, 0.7, 0.9])


@pytest.mark.parametrize("count", [1, 2, 10])
def test_plot_text_is_inside_the_figure(count):
    """Every title, label and legend lies inside the figure (one method used to clip the title on both sides)."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fastpref.demo.report import make_figure

    fig = make_figure([_fake_result(name, i) for i, name in enumerate(list(DEFAULT_METHODS)[:count])])
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        box = fig.bbox
        texts = []
        for ax in fig.axes:
            texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
            legend = ax.get_legend()
            if legend is not None:
                texts += list(legend.get_texts())
        texts = [t for t in texts if t.get_visible() and t.get_text()]
        assert any("held-out reward accuracy" in t.get_text() for t in texts)
        for t in texts:
            extent = t.get_window_extent(renderer)
            assert (extent.x0 >= box.x0 - 0.5 and extent.x1 <= box.x1 + 0.5 and extent.y0 >= box.y0 - 0.5
                    and extent.y1 <= box.y1 + 0.5), (t.get_text(), extent, box)
    finally:
        plt.close(fig)


def test_every_column_is_defined_in_the_output_and_the_readme(tmp_path, capsys):
    assert main(["demo", "--method", "simpo", "--out", str(tmp_path / "o"), *FAST]) == 0
    stdout = capsys.readouterr().out
    for column in COLUMNS[1:]:
        assert any(line.startswith(f"  {column}: ") for line in stdout.splitlines()), column
    assert "0.500" in stdout and "Razin" in stdout  # why acc before is 0.500; why d logp(chosen) is negative
    readme = (REPO / "README.md").read_text()
    demo = readme[readme.index("## The main command"):readme.index("\n## ", readme.index("## The main command") + 1)]
    for column in COLUMNS[1:]:
        assert f"`{column}`" in demo, column
    for text in ("0.500", "per method", "process"):
        assert text in demo


def test_demo_methods_map_to_trainer_calls():
    """Every demo method names the trainer call that trains it (the README and `fastpref demo --help` show it)."""
    from fastpref._method_names import TRAINER_CALLS, where

    assert set(DEFAULT_METHODS) <= set(TRAINER_CALLS)
    for name in METHODS:
        assert where(name) and TRAINER_CALLS[name] in where(name)
    assert "DPOConfig(loss_type='ipo')" in where("ipo") and "DPOConfig(loss_type='hinge')" in where("hinge")
    assert where("nope") is None
    readme = (REPO / "README.md").read_text()
    for name in DEFAULT_METHODS:
        assert TRAINER_CALLS[name] in readme, name
