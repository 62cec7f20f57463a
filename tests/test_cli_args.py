"""Every argument is checked before anything loads: a bad value is one line naming it, and it
wins over a model directory that does not exist (which would be found only when loading)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llava_jax.cli.main import main

CONFIGS = Path(__file__).parent.parent / "configs"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0 (0 is greedy), got -1.0"),
        (["--top-p", "nan"], "top_p must be in (0, 1] (1 is off), got nan"),
        (["--top-p", "0"], "top_p must be in (0, 1] (1 is off), got 0.0"),
        (["--top-k", "-2"], "top_k must be >= 0 (0 is off), got -2"),
        (["--repetition-penalty", "0"], "repetition_penalty must be > 0 (1 is off), got 0.0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be >= 1, got 0"),
        (["--template", "bogus"], "unknown template 'bogus'"),
        (["--prompt", "<image> and <image>", "--image", "a.png"],
         "--prompt has 2 <image> placeholder(s) for 1 --image file(s)"),
        (["--prompt", "<video> <image>", "--image", "a.png"],
         "--prompt has 1 <video> placeholder(s) for 0 --video file(s)"),
        (["--prompt", "<image> hi", "--raw"], "--prompt has 1 <image> placeholder(s) for 0"),
        (["--prompt", "\udcff hi"], "--prompt is not valid UTF-8 (byte 0xff at character 0)"),
        (["--video", "v.mp4", "--video-frames", "0"], "--video-frames must be >= 1, got 0"),
        (["--video", "v.mp4", "--video-fps", "-2"], "--video-fps must be > 0, got -2.0"),
        (["--video-fps", "2"], "--video-frames and --video-fps sample --video, which is not"),
    ],
)  # fmt: skip
def test_generate_checks_arguments_first(capsys, tmp_path, args, message):
    if "--prompt" not in args:
        args = [*args, "--prompt", "hi"]
    code, err = run(capsys, "generate", "--model", tmp_path / "missing", *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("llava-jax: error: "), err
    assert message in err[0], err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature must be >= 0 (0 is greedy), got -1.0"),
        (["--template", "bogus"], "unknown template 'bogus'"),
    ],
)
def test_chat_checks_arguments_first(capsys, tmp_path, args, message):
    code, err = run(capsys, "chat", "--model", tmp_path / "missing", *args)
    assert code == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batch_size=-4", "config.train.batch_size=-4 must be >= 1"),
        ("train.num_epochs=nan", "config.train.num_epochs=nan must be > 0"),
        ("optimizer.warmup_ratio=1.5", "config.optimizer.warmup_ratio=1.5 must be in [0, 1]"),
        ("data.max_len=0", "config.data.max_len=0 must be >= 1"),
        ("data.template=bogus", "unknown template 'bogus'"),
    ],
)
def test_train_checks_the_config_before_the_data(capsys, tmp_path, override, message):
    """The tiny run generates its dataset first (~20 s): a bad value must stop it before."""
    workdir = tmp_path / "run"
    code, err = run(capsys, "train", "--config", CONFIGS / "shapes_tiny.py", "--workdir",
                    workdir, f"--config.{override}")  # fmt: skip
    assert code == 2 and err[-1].startswith(f"llava-jax: error: {message}"), err
    assert not workdir.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "pope", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["eval", "pope", "--batch-size", "-1"], "--batch-size must be >= 1, got -1"),
        (["eval", "pope", "--template", "bogus"], "unknown template 'bogus'"),
        (["serve", "--template", "bogus"], "unknown template 'bogus'"),
    ],
)
def test_eval_and_serve_check_arguments_first(capsys, tmp_path, argv, message):
    data = ["--data", tmp_path / "missing-data"] if argv[0] == "eval" else []
    code, err = run(capsys, *argv, "--model", tmp_path / "missing", *data)
    assert code == 2 and len(err) == 1 and message in err[0], err
