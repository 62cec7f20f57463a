"""`llava-jax generate --prompts FILE.jsonl`: many prompts on the continuous-batching engine.

The reference for every line is `llava-jax generate --prompt` on that prompt alone. The CLI
runs in-process (`main`), on the tiny random HF LLaVA directory the other generate tests use.
"""

from __future__ import annotations

import io
import json
import os
import sys
from types import SimpleNamespace

import hf_tiny
import numpy as np
import pytest
from PIL import Image

from llava_jax.checks.tiny_tokenizer import build_tiny_tokenizer
from llava_jax.cli.main import main

FLAGS = ["--template", "vicuna_v1", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return hf_tiny.save_llava_dir(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def media(tmp_path):
    """prompts/ with two images in prompts/media/, and a working directory elsewhere."""
    folder = tmp_path / "prompts"
    (folder / "media").mkdir(parents=True)
    rng = np.random.RandomState(0)
    for name, hw in (("a.png", (60, 90)), ("b.png", (40, 40))):
        Image.fromarray(rng.randint(0, 255, (*hw, 3), np.uint8)).save(folder / "media" / name)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # relative paths must not resolve against the working directory
    yield folder
    os.chdir(cwd)


def write_lines(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def run(capsys, *args):
    code = main(["generate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


ENTRIES = [
    {"prompt": "What is in the picture?", "image": "media/a.png"},
    {"prompt": "Which colours?", "image": "media/a.png", "id": "colours"},
    {"prompt": "Describe it.", "image": ["media/b.png"]},
    {"prompt": "Say hello."},
    {"prompt": "<image> and <image>: the same?", "image": ["media/a.png", "media/b.png"]},
    {"prompt": "Anything else?", "image": "media/a.png"},
]


def test_many_prompts_match_one_at_a_time(model_dir, media, capsys, monkeypatch):
    """Shared and different images, text only and two images, in 2 slots: per line the
    tokens of `generate --prompt` alone, in input order, relative paths against the file;
    no more than 2 prompts' media loaded and not yet answered at any time."""
    from llava_jax.cli import generate_many

    held, most = [0], [0]

    def build(*a, build=generate_many._build_prompt):
        held[0] += 1
        most[0] = max(most[0], held[0])
        return build(*a)

    def finished(self, *a, finished=generate_many.Writer.finished):
        held[0] -= 1
        return finished(self, *a)

    monkeypatch.setattr(generate_many, "_build_prompt", build)
    monkeypatch.setattr(generate_many.Writer, "finished", finished)
    prompts = write_lines(media / "prompts.jsonl", ENTRIES)
    code, out, err = run(capsys, "--model", model_dir, "--prompts", prompts, "--batch-size", 2,
                         *FLAGS)  # fmt: skip
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["id"] for a in answers] == [1, "colours", 3, 4, 5, 6]
    assert "(6/6 answers written" in err
    hits = int(err.split("(prefix cache: ")[1].split(" hits")[0])
    assert hits >= 2, err  # lines 2 and 6 ask about line 1's image
    assert most[0] == 2 and held[0] == 0
    monkeypatch.undo()
    for entry, answer in zip(ENTRIES, answers, strict=True):
        images = entry.get("image", [])
        images = [images] if isinstance(images, str) else images
        flags = [f for i in images for f in ("--image", media / i)]
        code, alone, err = run(capsys, "--model", model_dir, "--prompt", entry["prompt"], *flags,
                               *FLAGS, "--json")  # fmt: skip
        assert code == 0, err
        alone = json.loads(alone)
        assert answer["token_ids"] == alone["token_ids"], (entry, answer, alone)
        assert answer["text"] == alone["text"]
        assert answer["prompt_tokens"] == alone["prompt_tokens"]
        assert answer["finish_reason"] in ("stop", "length")


def test_stdin_paths_are_against_the_working_directory(model_dir, media, capsys, monkeypatch):
    os.chdir(media)
    data = json.dumps({"prompt": "What is it?", "image": "media/b.png", "id": [1, "x"]}) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    code, out, err = run(capsys, "--model", model_dir, "--prompts", "-", *FLAGS)
    assert code == 0, err
    assert json.loads(out)["id"] == [1, "x"]


def test_out_is_refused_when_it_exists_and_resumed(model_dir, media, capsys):
    prompts = write_lines(media / "prompts.jsonl", ENTRIES[:3])
    answers = media / "answers.jsonl"
    code, out, err = run(capsys, "--model", model_dir, "--prompts", prompts, "--out", answers,
                         *FLAGS)  # fmt: skip
    assert code == 0, err
    assert out == ""
    first = answers.read_text()
    assert [json.loads(line)["id"] for line in first.splitlines()] == [1, "colours", 3]

    code, _, err = run(capsys, "--model", model_dir, "--prompts", prompts, "--out", answers)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"llava-jax: error: --out {answers} exists; pass --resume to skip the ids already "
        "answered in it, or choose another file"
    )
    assert answers.read_text() == first

    write_lines(prompts, ENTRIES)
    code, _, err = run(capsys, "--model", model_dir, "--prompts", prompts, "--out", answers,
                       "--resume", *FLAGS)  # fmt: skip
    assert code == 0, err
    assert f"(--resume: 3 of 6 prompts already answered in {answers})" in err
    text = answers.read_text()
    assert text.startswith(first)
    assert [json.loads(line)["id"] for line in text.splitlines()] == [1, "colours", 3, 4, 5, 6]


BAD = {
    "bad-json": (b'{"prompt": "hi"}\n{"prompt": \n', ":2: not a JSON line"),
    "missing-prompt": (b'{"image": "media/a.png"}\n', ':1: "prompt" (a string) is missing'),
    "unknown-key": (b'{"prompt": "hi", "images": "media/a.png"}\n', ":1: unknown key(s) 'images'"),
    "missing-media": (
        b'{"prompt": "hi"}\n{"prompt": "hi", "image": "a.png"}\n',
        ':2: "image" a.png: no such file',
    ),  # fmt: skip
    "not-an-image": (b'{"prompt": "hi", "image": "prompts.jsonl"}\n', "not an image"),
    "placeholders": (
        b'{"prompt": "<image> <image>", "image": "media/a.png"}\n',
        ':1: "prompt" has 2 <image> placeholder(s) for 1 "image" file(s)',
    ),
    "utf8": (b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n', ":2: not valid UTF-8 (byte 0xe9"),
    "duplicate-id": (
        b'{"prompt": "a", "id": 7}\n{"prompt": "b", "id": 7}\n',
        ":2: id 7 is already that of line 1",
    ),  # fmt: skip
    "empty": (b"\n", "no prompts in it"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_line_is_one_line_before_the_model_loads(media, capsys, case):
    """The model directory does not exist: each error must come before it is looked at."""
    data, message = BAD[case]
    prompts = media / "prompts.jsonl"
    prompts.write_bytes(data)
    code, out, err = run(capsys, "--model", media / "no-model", "--prompts", prompts)
    assert code == 2, err
    assert out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"llava-jax: error: {prompts}" if case != "empty" else "llava-jax:")
    assert message in err, err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prompt", "hi"], "give --prompt or --prompts, not both"),
        (["--image", "media/a.png"], "--image and --video go with --prompt"),
        (["--json"], "--prompts always writes JSON lines"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--resume"], "--resume skips the ids already in --out, which is not given"),
        (["--out", "no/such/a.jsonl"], "--out no/such/a.jsonl: cannot write in no/such (no such"),
        (["--video-frames", "4"], "no line of"),
    ],
)
def test_bad_flags_are_refused(media, capsys, flags, message):
    prompts = write_lines(media / "prompts.jsonl", [{"prompt": "hi"}])
    code, _, err = run(capsys, "--model", media / "no-model", "--prompts", prompts, *flags)
    assert code == 2, err
    assert message in err.strip().splitlines()[-1], err


def test_many_prompts_flags_are_refused_with_one_prompt(media, capsys):
    code, _, err = run(capsys, "--model", media / "no-model", "--prompt", "hi", "--out",
                       media / "a.jsonl", "--batch-size", 4)  # fmt: skip
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "llava-jax: error: --batch-size and --out go with --prompts, not --prompt"
    )


def test_prompt_over_the_context_names_its_line(model_dir, media, capsys):
    prompts = write_lines(media / "p.jsonl", [{"prompt": "hi"}, {"prompt": "word " * 300}])
    code, out, err = run(capsys, "--model", model_dir, "--prompts", prompts, "--raw")
    assert code == 2
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"llava-jax: error: {prompts}:2: the prompt of "), last
    assert "fills the model's context of 256 tokens" in last


def test_answers_are_written_in_input_order_as_soon_as_they_can_be(capsys):
    """Line 3 ends first and waits; line 1 is written when it ends; line 2 lets 3 out."""
    from llava_jax.cli.generate_many import Line, Writer

    out = io.StringIO()
    writer = Writer(SimpleNamespace(decode=lambda ids: f"t{ids}"), out, total=3)

    def finish(index):
        line = Line(f"f:{index + 1}: ", f"id{index}", "q", (), None, ())
        request = SimpleNamespace(token_ids=[index], prompt=SimpleNamespace(input_ids=[0] * 5),
                                  finish_reason="length", error=None)  # fmt: skip
        writer.finished(index, line, request)
        return [json.loads(t)["id"] for t in out.getvalue().splitlines()]

    assert finish(2) == []
    assert finish(0) == ["id0"]
    assert finish(1) == ["id0", "id1", "id2"]
    assert json.loads(out.getvalue().splitlines()[2]) == {
        "id": "id2", "text": "t[2]", "token_ids": [2], "prompt_tokens": 5,
        "finish_reason": "length",
    }  # fmt: skip


@pytest.mark.parametrize(
    "written, message",
    [
        (b'{"id": 1, "text": "a"}\n{"id": 2, "te', "its last line is cut off (no newline)"),
        (b'{"id": 1}\nnot json\n', "answers.jsonl:2: not an answer line"),
    ],
    ids=["cut-off", "not-json"],
)
def test_resume_refuses_an_out_it_cannot_read(media, capsys, written, message):
    prompts = write_lines(media / "prompts.jsonl", [{"prompt": "hi"}])
    answers = media / "answers.jsonl"
    answers.write_bytes(written)
    code, _, err = run(capsys, "--model", media / "no-model", "--prompts", prompts, "--out",
                       answers, "--resume")  # fmt: skip
    assert code == 2
    assert message in err.strip().splitlines()[-1], err
    assert answers.read_bytes() == written


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    from transformers import LlavaOnevisionImageProcessorPil

    path = tmp_path_factory.mktemp("ov")
    model = hf_tiny.llava_onevision()
    model.save_pretrained(path)
    build_tiny_tokenizer().save_pretrained(path)
    LlavaOnevisionImageProcessorPil(
        size={"height": hf_tiny.CROP, "width": hf_tiny.CROP},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    ).save_pretrained(path)
    rng = np.random.RandomState(0)
    frames = [Image.fromarray(rng.randint(0, 255, (40, 40, 3), np.uint8)) for _ in range(6)]
    frames[0].save(path / "clip.gif", save_all=True, append_images=frames[1:])
    return path


@pytest.mark.slow  # a second model (OneVision) and video decoding, ~20 s: `pytest -m slow`
def test_video_lines_sampled_match_one_at_a_time(onevision_dir, capsys):
    """Videos (an animated GIF, no PyAV needed), sampled: `--seed` is given to each line, so
    each answer is the one `generate --prompt --video` samples alone."""
    flags = ["--template", "qwen_1_5", "--max-new-tokens", "5", "--video-frames", "4",
             "--temperature", "1.0", "--seed", "3"]  # fmt: skip
    entries = [{"prompt": "What happens?", "video": "clip.gif"},
               {"prompt": "<video> And then?", "video": "clip.gif"}]  # fmt: skip
    prompts = write_lines(onevision_dir / "videos.jsonl", entries)
    code, out, err = run(capsys, "--model", onevision_dir, "--prompts", prompts, *flags)
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    for entry, answer in zip(entries, answers, strict=True):
        code, alone, err = run(capsys, "--model", onevision_dir, "--prompt", entry["prompt"],
                               "--video", onevision_dir / "clip.gif", *flags, "--json")  # fmt: skip
        assert code == 0, err
        alone = json.loads(alone)
        assert answer["token_ids"] == alone["token_ids"], (entry, answer, alone)
        assert answer["prompt_tokens"] == alone["prompt_tokens"]
