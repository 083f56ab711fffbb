"""What a newcomer meets first (issue 27): exports that load without unused weights, config and data
mistakes caught before torch and DeepSpeed start, override errors named as overrides, log lines a
progress bar does not overwrite, and default outputs that never land in tracked files."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config, to_dict
from engine.preflight import check_data
from engine.progress import eta
from tests.helpers import tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("use_nsp", [True, False])
def test_bert_export_loads_as_a_masked_lm_without_unused_or_missing_weights(use_nsp, tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM

    from engine.models import family

    model = tiny_model(use_nsp=use_nsp)
    state = {f"hf.{k}": v for k, v in model.hf.state_dict().items() if k != "cls.predictions.decoder.weight"}
    family("bert").from_state(state, model.export_config()).save_pretrained(tmp_path)
    loaded, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # missing, unexpected, mismatched, error messages
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.hf.state_dict()[name]), name
    if use_nsp:  # --nsp-head: the class it trained, every weight kept
        full = family("bert").from_state(state, model.export_config(), nsp_head=True)
        assert type(full) is type(model.hf)
        for name, tensor in model.hf.state_dict().items():
            assert torch.equal(full.state_dict()[name], tensor), name
        # the checkpoint is checked against the class it trained
        del state["hf.cls.seq_relationship.weight"]
        with pytest.raises(Exception, match="does not match BertForPreTraining.*seq_relationship"):
            family("bert").from_state(state, model.export_config())


def test_override_problems_are_labelled_as_overrides():
    with pytest.raises(ConfigError) as e:
        load_config("demo-cpu", ["train.stepz=5", "sift.keep=2"])
    msg = str(e.value)
    assert "with command-line overrides" in msg
    assert "command-line override 'train.stepz=5': train.stepz: unknown key (did you mean 'steps'?)" in msg
    assert "command-line override 'sift.keep=2': sift.keep: must be in (0, 1]" in msg


def test_a_problem_in_the_file_is_not_labelled_as_an_override(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  stepz: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.yaml", ["train.steps=5"])
    assert "  - train.stepz: unknown key" in str(e.value) and "command-line override" not in str(e.value)


def test_missing_data_names_the_key_and_the_fix(tmp_path):
    cfg = load_config("demo-cpu", [f"data.path={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"data\.path: dataset directory .*nothing does not exist; write one "
                                          r"with `sift prepare"):
        check_data(cfg)


def test_a_missing_or_small_validation_split_says_what_to_do(tiny_data):
    cfg = load_config("demo-cpu", [f"data.path={tiny_data}", "data.eval_split=test"])
    with pytest.raises(ConfigError, match=r"no split 'test' \(splits: train, validation\).*--val-fraction"):
        check_data(cfg)
    cfg = load_config("demo-cpu", [f"data.path={tiny_data}", "train.eval_batch_size=100000"])
    with pytest.raises(ConfigError, match=r"fewer than one evaluation batch per rank"):
        check_data(cfg)
    cfg = load_config("demo-cpu", [f"data.path={tiny_data}", "train.eval_samples=100000"])  # a study preset's 1,024
    with pytest.raises(ConfigError, match=r"train.eval_samples=100000 but split 'validation' of .* has \d+ rows; "
                                          r"set train.eval_samples to \d+ or fewer \(0: the whole split\)"):
        check_data(cfg)
    check_data(load_config("demo-cpu", [f"data.path={tiny_data}"]))  # a good dataset passes


def test_sift_train_fails_on_missing_data_before_torch_loads(tmp_path):
    """The check runs before torch and DeepSpeed are imported (timings: the final report, not here)."""
    probe = ("import sys; from launcher.cli import main; code = main(sys.argv[1:]); "
             "assert 'deepspeed' not in sys.modules, 'deepspeed was imported'; sys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", probe, "train", "--config", "demo-cpu", "data.path=nowhere"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "sift train: error: run config vs data" in result.stderr and "sift prepare" in result.stderr


def test_eta_counts_this_sessions_pace_and_the_time_budget():
    assert eta(300, 1000, 100, 20.0) == "300/1000, 0:20 elapsed, about 1:10 left"
    assert eta(300, 1000, 100, 20.0, budget_s=50) == "300/1000, 0:20 elapsed, about 0:30 left (train.time_budget_s)"
    assert eta(100, 1000, 100, 3.0) == "100/1000, 0:03 elapsed"


def test_the_progress_bar_can_show_the_time_budget_left(tmp_path, capsys):
    """With train.time_budget_s the bar shows what is left of it next to tqdm's estimate for all steps."""
    from engine.metrics import MetricLogger

    logger = MetricLogger(tmp_path, enabled=True, tensorboard=False, progress=True, total_steps=1000, initial_step=0)
    logger.progress(125, {"loss": 6.6381, "seq/s": 5.774, "budget left": "3:12"})
    logger.close()
    assert "loss=6.638, seq/s=5.774, budget left=3:12" in capsys.readouterr().err


def test_log_lines_are_written_through_tqdm_so_a_bar_never_overwrites_them():
    from tqdm import tqdm

    from sift_common.logs import _Handler

    stream = io.StringIO()
    handler = _Handler(stream)
    bar = tqdm(total=10, file=stream, ascii=True)
    bar.update(3)
    stream.truncate(0), stream.seek(0)
    handler.emit(logging.LogRecord("sift.train", logging.INFO, __file__, 1, "hello", None, None))
    bar.close()
    out = stream.getvalue()
    assert "\rhello\n" in out  # the bar's line is cleared, the log line starts at column 0 ...
    assert out.index("hello") < out.rindex("3/10")  # ... and the bar is drawn again after it


def test_other_libraries_info_lines_are_hidden_but_warnings_are_not():
    from sift_common.logs import _ours_or_warning

    def rec(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "x", None, None)

    assert _ours_or_warning(rec("sift.train", logging.INFO)) and _ours_or_warning(rec("engine.ds", logging.INFO))
    assert not _ours_or_warning(rec("matplotlib.font_manager", logging.INFO))
    assert _ours_or_warning(rec("DeepSpeed", logging.WARNING))


def test_deepspeed_op_build_is_announced_only_when_not_built(tmp_path, monkeypatch, caplog):
    from engine import ds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="engine.ds"):
        ds.announce_op_build()
    if ds.accelerator_name() != "cpu":
        pytest.skip("DeepSpeed builds this op on CPU only")
    if not caplog.records:
        pytest.skip("DeepSpeed would not build its CPU communication op on this machine")
    assert "compiling its CPU communication op" in caplog.text and "once for this environment" in caplog.text
    built = Path(caplog.records[0].args[1]) / f"{caplog.records[0].args[0]}.so"
    assert built.parent.is_relative_to(tmp_path)
    built.parent.mkdir(parents=True, exist_ok=True)
    built.touch()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engine.ds"):
        ds.announce_op_build()
    assert not caplog.records


def test_default_outputs_lie_under_runs_never_in_tracked_files():
    """`sift bench` (and the benchmark scripts) write their results under runs/ (git-ignored) unless --out
    names a place; the committed results are rewritten only on purpose."""
    import re

    from benchmarks.throughput import parse_args

    assert Path(parse_args([]).out).parts[0] == "runs"
    for script in sorted((REPO / "benchmarks").rglob("*.py")):
        for default in re.findall(r'add_argument\("--out"[^)]*default=([^,)]+)', script.read_text()):
            assert "results" not in default, f"{script.name}: --out defaults to {default}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/bench/x.json"], cwd=REPO)
    assert ignored.returncode == 0, "runs/ must be git-ignored"


def test_readme_train_commands_each_write_their_own_run():
    """Each `sift train` example in the README and docs/vcas.md that differs from another in what it
    trains has its own train.out_dir: run after `sift demo`, none resumes another's checkpoints."""
    from engine.resources import shipped
    from launcher.demo import TIME_BUDGET_S

    runs = {"sift demo": load_config("demo-cpu", ["data.path=runs/demo/data", "train.out_dir=runs/demo/train",
                                                  f"train.time_budget_s={TIME_BUDGET_S}"])}
    for doc in ("README.md", "docs/vcas.md"):
        for line in (REPO / doc).read_text().replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if not line.startswith("sift train --config"):
                continue
            argv = shlex.split(line)[2:]
            if Path(argv[1]).stem in shipped("configs"):  # others name the reader's own file
                runs[line] = load_config(argv[1], argv[2:])
    assert len(runs) >= 7
    by_dir: dict[str, list[str]] = {}
    for line, cfg in runs.items():
        by_dir.setdefault(cfg.train.out_dir, []).append(line)
    for out_dir, lines in by_dir.items():  # where a run stops on time is not what it trains
        trees = {json.dumps(to_dict(runs[x]) | {"train": {**to_dict(runs[x].train), "time_budget_s": 0}},
                            sort_keys=True) for x in lines}
        assert len(trees) == 1, f"{out_dir} is written by different runs: {lines}"


def test_deepspeed_does_not_announce_its_accelerator_guess():
    """engine/ds.py names the CPU accelerator itself when there is no GPU, so no command prints
    DeepSpeed's "Setting accelerator to CPU ... unable to detect it" warning."""
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"} | {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", "import engine.ds as d; print(d.accelerator_name())"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Setting accelerator" not in result.stdout + result.stderr
